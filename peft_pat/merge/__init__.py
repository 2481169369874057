"""Merging: one plan (:mod:`.plan`) of what each stock tensor becomes, executed over a loaded model
(:mod:`.in_memory`) or over safetensors shards (:mod:`.checkpoint`); the pure fold and cut algebra is
:mod:`.fold`, the adapter side :mod:`.adapter`, shard I/O :mod:`.shards`.

Nothing is imported here, so the layers can use :mod:`.fold` without loading the executors."""
