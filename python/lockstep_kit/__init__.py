"""lockstep_kit: dump an engine's intermediate tensors in llama.cpp's tap naming for `lockstep compare`.

    from lockstep_kit import Recorder, KitError

See docs/judge-your-engine.md in the lockstep repository.
"""

from .errors import KitError
from .recorder import Recorder

__version__ = "0.1.0"
__all__ = ["Recorder", "KitError", "__version__"]
