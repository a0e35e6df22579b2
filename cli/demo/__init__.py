"""The embedded demo (`mmadapter demo`): a synthetic image world, a tiny LLaMA and CLIP, training and scoring."""
