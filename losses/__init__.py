from guided_concepts.losses.alignment import ALIGNMENT_KINDS, alignment_loss, identity_loss
from guided_concepts.losses.attention import MASK_ATTENTION_VARIANTS, attention_iou, attention_mass_inside, mask_attention_loss
from guided_concepts.losses.consistency import consistency_loss
from guided_concepts.losses.contrast import contrast_loss
from guided_concepts.losses.denoising import denoising_loss, denoising_target
from guided_concepts.losses.kl import gaussian_kl
from guided_concepts.losses.regularizers import offset_l2
from guided_concepts.losses.targets import word_target_loss

__all__ = ["ALIGNMENT_KINDS", "MASK_ATTENTION_VARIANTS", "alignment_loss", "attention_iou", "attention_mass_inside",
           "consistency_loss", "contrast_loss", "identity_loss", "denoising_loss", "denoising_target", "gaussian_kl", "mask_attention_loss", "offset_l2",
           "word_target_loss"]
