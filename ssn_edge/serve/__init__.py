"""KServe v2 / Open Inference Protocol REST server for bundles and OVMS-layout model repositories.

protocol: request/response records and their JSON + binary_data wire form; registry: the models and versions
served; repository: the OVMS model-repository layout (write and read); worker: per-model bounded queue and
threads; scoring: a request checked against its model and scored through the runtime; metrics: Prometheus
text; app: the HTTP routes; server: uvicorn, in the foreground or a thread. Torch-free: this runs on the IPC.
"""
