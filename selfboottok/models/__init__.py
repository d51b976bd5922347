"""SelfBootTok's models: tokenizer, bootstrap decoder, generators, and their building blocks."""

from .alignment import Alignment, AlignmentOutput, cosine_cost
from .bootstrap import BootstrapDecoder
from .generator import ARGenerator, MaskGIT, build_generator, sample_logits
from .quantizer import FSQuantizer, QuantizerOutput, VectorQuantizer, build_quantizer
from .tokenizer import Encoded, Encoder, PixelDecoder, Tokenizer

__all__ = [
    "Alignment", "AlignmentOutput", "cosine_cost", "BootstrapDecoder", "ARGenerator", "MaskGIT",
    "build_generator", "sample_logits", "FSQuantizer", "QuantizerOutput", "VectorQuantizer",
    "build_quantizer", "Encoded", "Encoder", "PixelDecoder", "Tokenizer",
]
