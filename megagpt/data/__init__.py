"""Token shards and the GPT sample stream (see docs/architecture.md, "Sample stream")."""
from megagpt.data.blend import BlendedDataset
from megagpt.data.config import DataConfig
from megagpt.data.gpt_dataset import GPTDataset, build_gpt_datasets, describe_samples
from megagpt.data.sampler import DistributedBatchSampler

__all__ = ["BlendedDataset", "DataConfig", "DistributedBatchSampler", "GPTDataset", "build_gpt_datasets",
           "describe_samples"]
