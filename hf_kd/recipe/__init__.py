"""Recipes: a whole distillation from a YAML file (``hf-kd distill``): its arguments (:mod:`.args`), data
(:mod:`.data`) and run (:mod:`.run`)."""
