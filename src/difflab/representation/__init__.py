"""The representation stage: autoencoders, latent encoders and the two-stage pipeline."""

from difflab.representation.autoencoder import Autoencoder, AutoencoderConfig
from difflab.representation.encoders import DiffusersEncoder, Encoder, LatentEncoder, PixelEncoder, load_encoder
from difflab.representation.losses import AutoencoderLoss, AutoencoderLossConfig, PatchDiscriminator
from difflab.representation.pipeline import encode_dataset

__all__ = ["Autoencoder", "AutoencoderConfig", "AutoencoderLoss", "AutoencoderLossConfig", "DiffusersEncoder",
           "Encoder", "LatentEncoder", "PatchDiscriminator", "PixelEncoder", "encode_dataset", "load_encoder"]
