"""Format readers: name -> module with DEFAULTS (world, frame, camera axes) and read(src, options)."""
from guided_concepts.prepare.formats import co3d, objaverse, photos, srn, transforms

FORMATS = {"transforms": transforms, "co3d": co3d, "objaverse": objaverse, "srn": srn, "photos": photos}
