"""The pipeline's stages, one file each, all with one interface (base.Stage).

Importing this package loads no torch: the service's pages read the stage names from here.
"""

# The order a run goes through them: features (a pretrained backbone) or pretext (SimCLR);
# select_k only when K is left open.
STAGE_NAMES: tuple[str, ...] = (
    "features",  # the pretrained route, instead of pretext
    "pretext",
    "mine",
    "select_k",
    "scan",
    "selflabel",
    "finalize",
)

__all__ = ["STAGE_NAMES"]
