"""Training shared by the fine-tune stage and pruning recovery: the loop (`loop`), and LoRA adapters
that it trains and merges when a recipe asks for `method: lora` (`lora`)."""

from pipeline.training.loop import TrainResult, train_model

__all__ = ["TrainResult", "train_model"]
