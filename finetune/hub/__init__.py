"""Model card, run manifest, and publishing a run to the Hugging Face Hub.

A run folder describes itself: `write_model_card` (card.py) turns recipe.yaml and metrics.json into adapter/README.md
(and merged/README.md), `write_manifest` (manifest.py) records versions, hashes and the recipe in run.json, and `push`
(publish.py) uploads the adapter (or the merged model) with both, then tags the commit with the run name.

Neither torch nor transformers is imported here, so `finetune push` starts in a fraction of a second; writing a card
imports the evaluation module lazily.
"""

from finetune.hub.card import write_model_card
from finetune.hub.manifest import write_manifest
from finetune.hub.publish import PushReport, push

__all__ = ["PushReport", "push", "write_manifest", "write_model_card"]
