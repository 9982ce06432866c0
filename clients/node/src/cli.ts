#!/usr/bin/env node
/**
 * infergate-infer: one ModelInfer from the shell, JSON in and JSON out.
 *
 *   node dist/cli.js '{"url": "127.0.0.1:8001", "model": "matmul16",
 *     "inputs": {"x": {"datatype": "FP32", "shape": [1, 16], "data": [0, 1, ...]}}}'
 *
 * Optional keys: token, deadlineMs, outputs, modelVersion, metadata, tls (the client's TlsOptions:
 * rootCertificates, privateKey, certificateChain as PEM file paths, serverName), and retry (the client's
 * RetryPolicy: maxAttempts, initialBackoffMs, maxBackoffMs, multiplier, jitter, and budgetTokens
 * for the RetryBudget's size; each retry is
 * reported on stderr as "retry N: CODE: details"). Prints
 * {"modelVersion": ..., "outputs": {name: {datatype, shape, data}}}; BYTES as strings,
 * 64-bit integers as decimal strings. Exit codes: 0 done, 2 bad request JSON, 4 the call failed.
 */
import { InferenceClient, InferGateError, RetryBudget, Tensor, TensorData } from "./index";

const BUILD: Record<string, (values: any[]) => TensorData> = {
  BOOL: (v) => Uint8Array.from(v.map((x) => (x ? 1 : 0))),
  UINT8: (v) => Uint8Array.from(v),
  UINT16: (v) => Uint16Array.from(v),
  UINT32: (v) => Uint32Array.from(v),
  UINT64: (v) => BigUint64Array.from(v.map(BigInt)),
  INT8: (v) => Int8Array.from(v),
  INT16: (v) => Int16Array.from(v),
  INT32: (v) => Int32Array.from(v),
  INT64: (v) => BigInt64Array.from(v.map(BigInt)),
  FP32: (v) => Float32Array.from(v),
  FP64: (v) => Float64Array.from(v),
  BYTES: (v) => v.map(String),
};

function toJson(data: TensorData): unknown[] {
  return Array.from(data as ArrayLike<unknown>, (x) =>
    typeof x === "bigint" ? x.toString() : Buffer.isBuffer(x) ? x.toString("utf8") : x,
  );
}

async function main(): Promise<number> {
  let request: any;
  try {
    request = JSON.parse(process.argv[2] ?? "");
  } catch (error) {
    console.error(`infergate-infer: the argument must be a JSON request (${error})`);
    return 2;
  }
  const inputs: Record<string, Tensor> = {};
  for (const [name, tensor] of Object.entries<any>(request.inputs ?? {})) {
    const build = BUILD[tensor.datatype];
    if (!build) {
      console.error(`infergate-infer: input ${name}: unsupported datatype ${tensor.datatype}`);
      return 2;
    }
    inputs[name] = { datatype: tensor.datatype, shape: tensor.shape, data: build(tensor.data) };
  }
  const retry = request.retry ?? {};
  const client = new InferenceClient(request.url, {
    token: request.token,
    deadlineMs: request.deadlineMs,
    metadata: request.metadata,
    tls: request.tls,
    retry: { ...retry, onRetry: (attempt, error) => console.error(`retry ${attempt}: ${error.message}`) },
    retryBudget: retry.budgetTokens !== undefined ? new RetryBudget(retry.budgetTokens) : undefined,
  });
  try {
    const result = await client.infer(request.model, inputs, {
      outputs: request.outputs,
      modelVersion: request.modelVersion,
    });
    const outputs: Record<string, unknown> = {};
    for (const [name, tensor] of Object.entries(result.outputs)) {
      outputs[name] = { datatype: tensor.datatype, shape: tensor.shape, data: toJson(tensor.data) };
    }
    console.log(JSON.stringify({ modelVersion: result.modelVersion, outputs }));
    return 0;
  } catch (error) {
    if (error instanceof InferGateError) {
      console.error(`infergate-infer: ${error.message}`);
      return 4;
    }
    throw error;
  } finally {
    client.close();
  }
}

main().then((code) => process.exit(code));
