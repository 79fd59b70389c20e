"""OpenAI's GPT-2: download, TensorFlow-free checkpoint reading and writing, loading, HF interop."""
