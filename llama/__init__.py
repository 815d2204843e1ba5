"""Code Llama inference: a drop-in replacement for Meta's reference `llama` package."""

from llama.formats import Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, InfillingPrediction, Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = [
    "Llama", "Tokenizer", "Transformer", "ModelArgs", "Dialog", "Message",
    "CompletionPrediction", "InfillingPrediction", "ChatPrediction",
]
