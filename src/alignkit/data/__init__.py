"""Datasets: local loading with provenance (io), formats and tokenisation (formats), batching (collate)."""

from alignkit.data.collate import (
    collate_preference, collate_prompts, collate_sft, length_grouped_batches, pad_sequences,
)
from alignkit.data.formats import (
    FORMATS, DataStats, Encoded, build_dataset, detect_format, encode_preference, encode_prompt,
    encode_prompt_completion, encode_unpaired, parse_record, prompt_ids,
)
from alignkit.data.io import DataError, Record, load_records

__all__ = [
    "FORMATS", "DataError", "DataStats", "Encoded", "Record", "build_dataset", "collate_preference",
    "collate_prompts", "collate_sft", "detect_format", "encode_preference", "encode_prompt",
    "encode_prompt_completion", "encode_unpaired", "length_grouped_batches", "load_records",
    "pad_sequences", "parse_record", "prompt_ids",
]
