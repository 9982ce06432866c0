"""Offline batch inference: ``infergate batch`` scores a file with the model version the server would serve.

The rows go through the same ``ModelVersion`` (config, execution providers,
dynamic batcher, instance threads) as online requests, in this process, or to
a running server through the SDK. Files are read and written in chunks, so
their size is not bounded by memory, and a run resumes after its last complete
chunk. Modules: :mod:`.readers` and :mod:`.columns` (input files),
:mod:`.writers` (outputs), :mod:`.state` (resume), :mod:`.executors` (local or
remote), :mod:`.engine` (the run), :mod:`.progress`, :mod:`.command` (the CLI).
Nothing is imported here, so parsing the command line does not load onnxruntime.
"""
