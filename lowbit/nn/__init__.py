"""Flax NNX layers that take a precision, and a transformer built from them."""

from lowbit.nn.encoder import Encoder, EncoderConfig, sentence_embedding
from lowbit.nn.layers import (
                              ActScale,
                              QEinsum,
                              QLinear,
                              QScale,
                              QuantState,
                              QValue,
                              WeightClip,
                              WeightScale,
                              WeightZeroPoint,
                              converted_bytes,
)
from lowbit.nn.surgery import convert, quantizable_layers, quantize_model, set_implementation
from lowbit.nn.transformer import Transformer, TransformerConfig

__all__ = [
    "ActScale", "Encoder", "EncoderConfig", "QEinsum", "QLinear", "QScale", "QValue", "QuantState",
    "Transformer",
    "TransformerConfig", "WeightClip", "WeightScale", "WeightZeroPoint", "convert",
    "converted_bytes", "quantizable_layers", "quantize_model", "sentence_embedding",
    "set_implementation",
]
