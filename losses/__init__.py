from losses.attention import MASK_ATTENTION_VARIANTS, attention_iou, attention_mass_inside, mask_attention_loss
from losses.consistency import consistency_loss
from losses.denoising import denoising_loss, denoising_target
from losses.regularizers import offset_l2

__all__ = ["MASK_ATTENTION_VARIANTS", "attention_iou", "consistency_loss", "attention_mass_inside", "denoising_loss",
           "denoising_target", "mask_attention_loss", "offset_l2"]
