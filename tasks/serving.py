"""MLflow pyfunc for the registered model, logged as "models from code" (no pickled objects).

Text in (a `text` column), L2-normalised embeddings out, through the ONNX text tower shipped in the
model's artifacts. Batch inference over images uses tasks.infer on the same artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd


class OnnxDualEncoderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from tasks.onnx_runtime import make_session

        onnx_dir = Path(context.artifacts["onnx"])
        self.meta = json.loads((onnx_dir / "meta.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(onnx_dir / "tokenizer")
        self.text = make_session(onnx_dir / "text_encoder.onnx")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        texts = [str(t) for t in model_input["text"]]
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.meta["max_length"],
            return_tensors="np",
        )
        feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        return self.text.run(None, feeds)[0]


mlflow.models.set_model(OnnxDualEncoderModel())
