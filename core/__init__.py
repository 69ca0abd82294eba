"""The bottom layer every other package stands on: storage, the dataset format, the config tree.

    core.storage    one storage layer for plain paths, file:// and s3:// (boto3; AWS_* variables)
    core.manifest   manifest.json of a prepared dataset
    core.shards     the shard format (WebDataset tars of packed samples): write and verify-read

Imports point one way: launchers -> cluster -> {mmrec, datasets_prep} -> {kernels, core}. Nothing
here imports torch or any other package of the project.
"""
