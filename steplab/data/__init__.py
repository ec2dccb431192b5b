"""Data: sources -> tokenizer -> token shards -> batches.

Modules, in pipeline order: ``sources`` (iter_documents, split_of), ``tokenizer``
(Tokenizer, train_tokenizer), ``shards`` (write_shards, ShardSet), ``prepare``
(prepare_data, load_prepared) and ``loader`` (TokenLoader, iter_eval_batches).
Import from the modules directly; this package imports nothing so that
``import steplab.data`` stays cheap (no torch, no tokenizers).
"""
