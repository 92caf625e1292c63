"""`python -m hf_edit_patch.cli`: the `hf-edit-patch` command."""

import sys

from . import main

sys.exit(main())
