"""Serving a model to many callers: the continuous-batching engine and its OpenAI-compatible HTTP layer."""

from .engine import Completion, Engine, InvalidRequest, Output, QueueFull, Request, SamplingParams, TokenInfo

__all__ = ["Completion", "Engine", "InvalidRequest", "Output", "QueueFull", "Request", "SamplingParams", "TokenInfo"]
