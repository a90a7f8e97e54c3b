"""The passes ``optimize`` runs, by name: ``PASSES[name]`` = (pass class, options class).

A new pass: subclass ``passes.base.IdapPass`` (``call`` returns a ``PassResult`` and fills
``self.record``), give it a ``PassOptions`` subclass in ``idap_fx/options.py`` whose
``pass_name`` is the pass's name, and add the class to the tuple below. ``optimize``, its flat keywords, the
CLI's ``--passes`` and the report then know it.
"""

from __future__ import annotations

from typing import NamedTuple

from idap_fx.passes.base import IdapPass
from idap_fx.passes.prune_channels import PruneChannels
from idap_fx.passes.skip_layers import SkipLayers

from idap_fx.options import PassOptions


class PassSpec(NamedTuple):
    """A registered pass: its class and the class of its options."""

    pass_class: type[IdapPass]
    options_class: type[PassOptions]


PASSES: dict[str, PassSpec] = {c.name: PassSpec(c, c.options_class) for c in (PruneChannels, SkipLayers)}
