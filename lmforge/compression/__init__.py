"""Compression: magnitude pruning (prune), structured head/neuron pruning (structured), model merging (merge)."""
