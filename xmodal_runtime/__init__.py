"""xmodal's serving runtime: an exported bundle in, embeddings and retrievals out.

Imports numpy, onnxruntime, pillow, pyarrow and tokenizers only: never torch, torchvision,
Prefect, DVC or MLflow's training side. The MLflow pyfunc (`xmodal_runtime.pyfunc`) adds MLflow's
serving side and pandas. Import from the submodules:

    from xmodal_runtime.encoder import Encoder        # encode_images / encode_texts
    from xmodal_runtime.bundle import Bundle          # the exported folder's contract
    from xmodal_runtime.images import load_image      # decoding identical to training
    from xmodal_runtime.retrieval import TopK         # streaming top-k
    from xmodal_runtime.batch import embed_folder     # batch inference with outputs on disk

This file imports nothing, so each pipeline stage depends only on the runtime modules it uses.
"""
