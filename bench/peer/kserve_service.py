"""digits-cnn served by KServe's own Python model server (kserve.ModelServer, the v2
REST protocol), on onnxruntime with the threads given, with the bundle's pre- and
post-processing (as bench/peer/bentoml_service.py does it: pixels scaled into the
graph's image, softmax, the labels), so that it answers what modelfn answers: the peer
of bench/busy_neighbour.py. Runs in its own environment (bench/.cache/venv-kserve).

    python kserve_service.py BUNDLE_DIR PORT THREADS
"""

import json
import sys
from pathlib import Path

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class Digits(kserve.Model):
    def __init__(self, bundle: Path, threads: int) -> None:
        super().__init__("digits-cnn")
        manifest = json.loads((bundle / "manifest.json").read_text())
        self.labels = np.array(manifest["postprocess"]["labels"], dtype=object)
        self.scale = np.float32(manifest["preprocess"].get("scale", 1.0))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(bundle / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):
        x = payload.inputs[0].as_numpy().astype(np.float32).reshape(-1, 1, 8, 8) * self.scale
        logits = self.session.run(None, {self.input: x})[0]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
        out = InferOutput(name="probabilities", shape=list(probs.shape), datatype="FP32")
        out.set_data_from_numpy(probs)
        labels = self.labels[probs.argmax(axis=1)]
        label = InferOutput(name="label", shape=[len(labels)], datatype="BYTES")
        label.set_data_from_numpy(labels)
        return InferResponse(model_name=self.name, infer_outputs=[out, label],
                             response_id=payload.id or "")


if __name__ == "__main__":
    bundle, port, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    kserve.ModelServer(http_port=port, grpc_port=port + 1, workers=1,
                       enable_grpc=False).start([Digits(bundle, threads)])
