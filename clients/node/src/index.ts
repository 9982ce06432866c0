/**
 * A TypeScript client for infergate and any Open Inference Protocol (KServe V2) gRPC server.
 *
 * The service comes from the repository's `proto/grpc_service.proto`, loaded at run time with
 * `@grpc/proto-loader` (one source of truth with the server and the Python SDK). Tensors travel
 * as raw little-endian bytes, the way infergate and Triton send and read them.
 *
 *   const client = new InferenceClient("127.0.0.1:8001", { token: "..." });
 *   const out = await client.infer("matmul16", { x: { data: new Float32Array(16), shape: [1, 16] } });
 *   out.outputs.y.data; // Float32Array
 */
import * as fs from "fs";
import * as path from "path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

export type TypedArray =
  | Uint8Array
  | Uint16Array
  | Uint32Array
  | BigUint64Array
  | Int8Array
  | Int16Array
  | Int32Array
  | BigInt64Array
  | Float32Array
  | Float64Array;

/** BYTES tensors are arrays of Buffers (or strings on the way in); FP16 travels as raw Uint16Array bits. */
export type TensorData = TypedArray | Array<Buffer | string>;

export interface Tensor {
  data: TensorData;
  shape: number[];
  /** V2 datatype; inferred from the typed array when left out (Uint8Array means UINT8, not BOOL). */
  datatype?: string;
}

export interface OutputTensor {
  data: TensorData;
  shape: number[];
  datatype: string;
}

export interface ClientOptions {
  /** Default deadline of each call in milliseconds (default 30000): every call has one. */
  deadlineMs?: number;
  /** A bearer token, or a function returning one (called before each call: refresh it there). */
  token?: string | (() => string | Promise<string>);
  /** Metadata sent with every call, e.g. { "x-user-id": "alice" }. */
  metadata?: Record<string, string>;
  /** TLS from PEM files or their contents (the Python SDK's `Tls`); plaintext when neither this nor `credentials`. */
  tls?: TlsOptions;
  /** Channel credentials built by hand with `@grpc/grpc-js` (instead of `tls`). */
  credentials?: grpc.ChannelCredentials;
  /** Folder holding grpc_service.proto (default: the repository's proto/). */
  protoDir?: string;
  /** Retries of calls that failed with UNAVAILABLE (the Python SDK's policy and defaults). */
  retry?: RetryPolicy;
  /** The client-wide budget that stops retry storms (default: 10 tokens, 0.1 back per success). */
  retryBudget?: RetryBudget;
}

/**
 * TLS settings, as the Python SDK's `Tls`: each certificate or key is a PEM file's path or its
 * contents (a Buffer). `rootCertificates` left out trusts the system's roots; `privateKey` and
 * `certificateChain` together present a client certificate (mutual TLS); `serverName` is the name
 * checked in the server's certificate when it differs from the host in the URL.
 */
export interface TlsOptions {
  rootCertificates?: string | Buffer;
  privateKey?: string | Buffer;
  certificateChain?: string | Buffer;
  serverName?: string;
}

function pem(value: string | Buffer | undefined): Buffer | undefined {
  return value === undefined || Buffer.isBuffer(value) ? value : fs.readFileSync(value);
}

/** Channel credentials and options for `tls`; throws an Error saying what is wrong with it. */
function tlsCredentials(tls: TlsOptions): [grpc.ChannelCredentials, Record<string, string>] {
  if ((tls.privateKey === undefined) !== (tls.certificateChain === undefined)) {
    throw new Error("tls: privateKey and certificateChain go together (a client certificate needs both)");
  }
  const credentials = grpc.credentials.createSsl(
    pem(tls.rootCertificates) ?? null,
    pem(tls.privateKey) ?? null,
    pem(tls.certificateChain) ?? null,
  );
  const names: Record<string, string> = {};
  if (tls.serverName) {
    names["grpc.ssl_target_name_override"] = tls.serverName;
    names["grpc.default_authority"] = tls.serverName;
  }
  return [credentials, names];
}

/**
 * Retries of calls that failed with UNAVAILABLE, and only those (a server restarting, a
 * connection refused): never INVALID_ARGUMENT, DEADLINE_EXCEEDED or the rest. Attempt n (from 1)
 * is followed by a pause of min(maxBackoffMs, initialBackoffMs * multiplier^(n-1)), scaled by a
 * random factor in [1 - jitter, 1 + jitter]; no pause runs past the call's deadline, which covers
 * every attempt. `onRetry(attempt, error)` is told of each retry.
 */
export interface RetryPolicy {
  maxAttempts?: number; // default 5; 1 turns retries off
  initialBackoffMs?: number; // default 100
  maxBackoffMs?: number; // default 5000
  multiplier?: number; // default 2
  jitter?: number; // default 0.2
  onRetry?: (attempt: number, error: InferGateError) => void;
}

/**
 * gRPC's retry throttling: a bucket that starts full at `maxTokens`; each UNAVAILABLE costs one
 * token and each success gives `tokenRatio` back; retries are allowed only while more than half
 * the tokens are left. Share one between clients to throttle them together.
 */
export class RetryBudget {
  private tokens: number;

  constructor(
    readonly maxTokens = 10,
    readonly tokenRatio = 0.1,
  ) {
    if (!(maxTokens > 0) || !(tokenRatio >= 0)) throw new RangeError("maxTokens must be > 0 and tokenRatio >= 0");
    this.tokens = maxTokens;
  }

  get left(): number {
    return this.tokens;
  }

  onSuccess(): void {
    this.tokens = Math.min(this.maxTokens, this.tokens + this.tokenRatio);
  }

  /** Spend a token for a failure; true when a retry is still allowed. */
  onFailure(): boolean {
    this.tokens = Math.max(0, this.tokens - 1);
    return this.tokens > this.maxTokens / 2;
  }
}

const UNAVAILABLE = 14;

export interface InferOptions {
  outputs?: string[];
  modelVersion?: string;
  requestId?: string;
  deadlineMs?: number;
  metadata?: Record<string, string>;
}

export interface InferResult {
  modelName: string;
  modelVersion: string;
  id: string;
  outputs: Record<string, OutputTensor>;
}

/** One request of a stream to send: what `infer` takes, as one value. */
export interface StreamRequest {
  model: string;
  inputs: Record<string, Tensor>;
  options?: Omit<InferOptions, "deadlineMs" | "metadata">; // the stream's own deadline and metadata apply
}

/** A failed call: `code` is the gRPC status number, `codeName` its name (e.g. "INVALID_ARGUMENT"). */
export class InferGateError extends Error {
  constructor(
    readonly code: number,
    readonly codeName: string,
    readonly details: string,
  ) {
    super(`${codeName}: ${details}`);
    this.name = "InferGateError";
  }
}

/**
 * One request of a stream failed (a stream reply carries a message, not a status code: `code` is
 * 2, UNKNOWN); `requestId` names the request when it had an id. As the Python SDK's InferenceFailed.
 */
export class InferenceFailed extends InferGateError {
  constructor(
    details: string,
    readonly requestId: string,
  ) {
    super(2, "INFERENCE_FAILED", details);
    this.name = "InferenceFailed";
  }
}

type ArrayCtor = { new (buffer: ArrayBuffer, offset: number, length: number): TypedArray; BYTES_PER_ELEMENT: number };

const ARRAYS: Record<string, ArrayCtor> = {
  BOOL: Uint8Array,
  UINT8: Uint8Array,
  UINT16: Uint16Array,
  UINT32: Uint32Array,
  UINT64: BigUint64Array,
  INT8: Int8Array,
  INT16: Int16Array,
  INT32: Int32Array,
  INT64: BigInt64Array,
  FP16: Uint16Array,
  FP32: Float32Array,
  FP64: Float64Array,
};

const BY_CONSTRUCTOR = new Map<unknown, string>([
  [Uint8Array, "UINT8"],
  [Uint16Array, "UINT16"],
  [Uint32Array, "UINT32"],
  [BigUint64Array, "UINT64"],
  [Int8Array, "INT8"],
  [Int16Array, "INT16"],
  [Int32Array, "INT32"],
  [BigInt64Array, "INT64"],
  [Float32Array, "FP32"],
  [Float64Array, "FP64"],
]);

export function datatypeOf(tensor: Tensor): string {
  if (tensor.datatype) return tensor.datatype;
  if (Array.isArray(tensor.data)) return "BYTES";
  const name = BY_CONSTRUCTOR.get(tensor.data.constructor);
  if (!name) throw new TypeError(`no V2 datatype for ${tensor.data.constructor.name}`);
  return name;
}

/** The raw wire bytes of one tensor: little-endian numbers, or 4-byte length-prefixed BYTES elements. */
export function encodeTensor(tensor: Tensor): Buffer {
  if (Array.isArray(tensor.data)) {
    const parts: Buffer[] = [];
    for (const item of tensor.data) {
      const bytes = typeof item === "string" ? Buffer.from(item, "utf8") : item;
      const length = Buffer.alloc(4);
      length.writeUInt32LE(bytes.length);
      parts.push(length, bytes);
    }
    return Buffer.concat(parts);
  }
  return Buffer.from(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength);
}

/** One raw output as a typed array (copied to an aligned buffer) or, for BYTES, an array of Buffers. */
export function decodeTensor(datatype: string, shape: number[], raw: Buffer): TensorData {
  const count = shape.reduce((a, b) => a * b, 1);
  if (datatype === "BYTES") {
    const items: Buffer[] = [];
    let offset = 0;
    for (let i = 0; i < count; i++) {
      const length = raw.readUInt32LE(offset);
      items.push(raw.subarray(offset + 4, offset + 4 + length));
      offset += 4 + length;
    }
    return items;
  }
  const Ctor = ARRAYS[datatype];
  if (!Ctor) throw new InferGateError(13, "INTERNAL", `unknown output datatype ${datatype}`);
  if (raw.length !== count * Ctor.BYTES_PER_ELEMENT) {
    throw new InferGateError(13, "INTERNAL", `${raw.length} bytes for ${datatype} shape [${shape}]`);
  }
  const aligned = new ArrayBuffer(raw.length);
  new Uint8Array(aligned).set(raw);
  return new Ctor(aligned, 0, count);
}

function defaultProtoDir(): string {
  // dist/index.js -> clients/node -> clients -> repository root
  return path.resolve(__dirname, "..", "..", "..", "proto");
}

type Unary = (request: object, metadata: grpc.Metadata, options: grpc.CallOptions, callback: grpc.requestCallback<any>) => void;

export class InferenceClient {
  private readonly stub: grpc.Client & Record<string, Unary>;
  private readonly options: ClientOptions;
  private readonly budget: RetryBudget;

  constructor(url: string, options: ClientOptions = {}) {
    this.options = options;
    this.budget = options.retryBudget ?? new RetryBudget();
    const definition = protoLoader.loadSync("grpc_service.proto", {
      includeDirs: [options.protoDir ?? defaultProtoDir()],
      keepCase: true,
      longs: Number,
      defaults: true,
      oneofs: true,
    });
    const loaded = grpc.loadPackageDefinition(definition) as any;
    const Service = loaded.inference.GRPCInferenceService as grpc.ServiceClientConstructor;
    if (options.tls !== undefined && options.credentials !== undefined) {
      throw new Error("give tls or credentials, not both");
    }
    const [credentials, names] =
      options.tls !== undefined
        ? tlsCredentials(options.tls)
        : [options.credentials ?? grpc.credentials.createInsecure(), {}];
    const channelOptions = { "grpc.max_receive_message_length": -1, "grpc.max_send_message_length": -1, ...names };
    this.stub = new Service(url, credentials, channelOptions) as unknown as grpc.Client & Record<string, Unary>;
  }

  close(): void {
    this.stub.close();
  }

  private async metadata(extra?: Record<string, string>): Promise<grpc.Metadata> {
    const metadata = new grpc.Metadata();
    for (const [key, value] of Object.entries({ ...this.options.metadata, ...extra })) metadata.set(key, value);
    const token = this.options.token;
    if (token !== undefined) {
      metadata.set("authorization", `Bearer ${typeof token === "function" ? await token() : token}`);
    }
    return metadata;
  }

  /** When a call (or a stream) started now must end: its own deadline, the client's, or 30 s. */
  private deadline(deadlineMs?: number): number {
    return Date.now() + (deadlineMs ?? this.options.deadlineMs ?? 30_000);
  }

  private async call<T>(method: string, request: object, deadlineMs?: number, extra?: Record<string, string>): Promise<T> {
    const deadline = this.deadline(deadlineMs);
    for (let attempt = 1; ; attempt++) {
      const metadata = await this.metadata(extra); // a refreshing token is asked again for each attempt
      try {
        const reply = await this.attempt<T>(method, request, metadata, deadline);
        this.budget.onSuccess();
        return reply;
      } catch (error) {
        const pause = this.retryPause(error, attempt, deadline);
        if (pause === undefined) throw error;
        await new Promise((resolve) => setTimeout(resolve, pause));
      }
    }
  }

  private attempt<T>(method: string, request: object, metadata: grpc.Metadata, deadline: number): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.stub[method](request, metadata, { deadline }, (error: grpc.ServiceError | null, reply: T) => {
        if (error) reject(new InferGateError(error.code, grpc.status[error.code] ?? "UNKNOWN", error.details));
        else resolve(reply);
      });
    });
  }

  /** Milliseconds to wait before the next attempt, or undefined to give up and throw `error`. */
  private retryPause(error: unknown, attempt: number, deadline: number): number | undefined {
    if (!(error instanceof InferGateError) || error.code !== UNAVAILABLE) return undefined;
    const policy = this.options.retry ?? {};
    if (!this.budget.onFailure() || attempt >= (policy.maxAttempts ?? 5)) return undefined;
    const base = Math.min(
      policy.maxBackoffMs ?? 5000,
      (policy.initialBackoffMs ?? 100) * (policy.multiplier ?? 2) ** (attempt - 1),
    );
    const jitter = policy.jitter ?? 0.2;
    const pause = base * (1 - jitter + 2 * jitter * Math.random());
    if (Date.now() + pause >= deadline) return undefined;
    policy.onRetry?.(attempt, error);
    return pause;
  }

  async isServerReady(): Promise<boolean> {
    return (await this.call<{ ready: boolean }>("ServerReady", {})).ready;
  }

  async isModelReady(model: string, version = ""): Promise<boolean> {
    return (await this.call<{ ready: boolean }>("ModelReady", { name: model, version })).ready;
  }

  /** Run `model` on `inputs` (typed arrays by name); resolves to the outputs by name. */
  async infer(model: string, inputs: Record<string, Tensor>, options: InferOptions = {}): Promise<InferResult> {
    const request = inferRequest(model, inputs, options);
    return inferResult(await this.call<any>("ModelInfer", request, options.deadlineMs, options.metadata));
  }

  /**
   * Send `requests` on one ModelStreamInfer stream; yields each result as it comes (possibly out
   * of order: match them by `options.requestId`). The Python SDK's contract: a failed request
   * throws InferenceFailed and ends the stream, a failed stream throws InferGateError, and
   * streams are not retried. `deadlineMs` covers the whole stream.
   */
  async *streamInfer(
    requests: Iterable<StreamRequest> | AsyncIterable<StreamRequest>,
    options: { deadlineMs?: number; metadata?: Record<string, string> } = {},
  ): AsyncGenerator<InferResult> {
    const deadline = this.deadline(options.deadlineMs);
    const call: grpc.ClientDuplexStream<object, any> = (this.stub as any).ModelStreamInfer(
      await this.metadata(options.metadata),
      { deadline },
    );
    const writing = (async () => {
      for await (const r of requests) call.write(inferRequest(r.model, r.inputs, r.options ?? {}));
      call.end();
    })();
    writing.catch((error) => call.destroy(error)); // a request that cannot be built ends the stream
    try {
      for await (const reply of call) {
        if (reply.error_message) throw new InferenceFailed(reply.error_message, reply.infer_response?.id ?? "");
        yield inferResult(reply.infer_response);
      }
      await writing;
    } catch (error) {
      if (error instanceof InferGateError) throw error;
      const failed = error as grpc.ServiceError;
      if (typeof failed.code !== "number") throw error;
      throw new InferGateError(failed.code, grpc.status[failed.code] ?? "UNKNOWN", failed.details);
    } finally {
      call.cancel();
    }
  }
}

function inferRequest(model: string, inputs: Record<string, Tensor>, options: InferOptions): object {
  const names = Object.keys(inputs);
  return {
    model_name: model,
    model_version: options.modelVersion ?? "",
    id: options.requestId ?? "",
    inputs: names.map((name) => ({ name, datatype: datatypeOf(inputs[name]), shape: inputs[name].shape })),
    outputs: (options.outputs ?? []).map((name) => ({ name })),
    raw_input_contents: names.map((name) => encodeTensor(inputs[name])),
  };
}

function inferResult(reply: any): InferResult {
  const outputs: Record<string, OutputTensor> = {};
  reply.outputs.forEach((tensor: any, i: number) => {
    const shape = tensor.shape.map(Number);
    const data = decodeTensor(tensor.datatype, shape, reply.raw_output_contents[i]);
    outputs[tensor.name] = { datatype: tensor.datatype, shape, data };
  });
  return { modelName: reply.model_name, modelVersion: reply.model_version, id: reply.id, outputs };
}
