"""Device backends. Importing this package (or any backend module) never imports torch_npu or needs a GPU."""
