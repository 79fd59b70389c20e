"""Training tasks: what the one training loop (`train.Trainer`) learns from.

A task brings its data (batched deterministically from an epoch and a position,
so that resumed runs read exactly what an uninterrupted one would) and its loss;
the Trainer brings everything else. `base.Task` is the contract;
`pretrain.LanguageModelTask` is next-token prediction on a token array;
`instruct.InstructTask` instruction fine-tuning and `classify.ClassifyTask` text
classification, both on records read by `records.read_records`.
"""
