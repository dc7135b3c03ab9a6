"""Names the model package's modules share (files of a checkpoint, config keys), so that the ChatGLM
format code and the adapter code both depend on them rather than on each other."""

REFERENCE_PREFIX = "transformer.prefix_encoder."  # key prefix of the reference's P-tuning file
PREFIX_WEIGHTS = "pytorch_model.bin"  # the raw prefix-encoder weights, the reference's layout
NATIVE_PREFIX_CONFIG = "prefix_config.json"  # a checkpoint of the model's own prefix encoder
SOURCE_KEY = "fedtune_source"  # config attribute of a model converted from a ChatGLM folder
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's weight file, either format
