"""crb: the Cognitive Retail Brain trainer. Recipe -> plan -> build -> loop -> artifacts."""

import os
import sys

__version__ = "0.1.0"

# Run as a program (`crb ...`, `python -m crb.run`, under accelerate launch or torchrun), before the libraries
# load: their console noise goes to the run's log (crb.console). Imported as a library, crb leaves logging alone.
if sys.argv and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "crb") and "--debug" not in sys.argv \
        and os.environ.get("CRB_DEBUG") != "1":
    from crb import console

    console.quiet()
