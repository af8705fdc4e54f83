"""``condcomp analyze RUN``: a report of what a run's routing learned.

One forward pass over the run's validation text, in eval mode (the routing validation and
generation use), records every routing decision through forward hooks on the conditional
layers (:mod:`.collect`); pure functions turn them into statistics (:mod:`.stats`); one module
per family writes its section (:mod:`.moe_section`, :mod:`.mod_section`,
:mod:`.sparse_ff_section`, :mod:`.altup_section`) from a :class:`.context.Context`, drawing
with :mod:`.figures`; :mod:`.write` puts the report together (:mod:`.document` renders it as
``report.md`` and ``report.html``) with PNG figures and ``analysis.json``.

This module imports nothing, so the command line can read the default without loading torch.
"""

# Validation tokens analysed by default: a few forward passes, seconds on a CPU.
DEFAULT_TOKENS = 4096
