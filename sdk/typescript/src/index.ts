/**
 * kiln's TypeScript SDK: the REST API of kilnd (microVM sandboxes from snapshot images),
 * typed with the types generated from spec/openapi.yaml. Runtime dependencies: none but
 * Node's own fetch (Node 20 or newer).
 */
export * from "./client.js";
export { KilnError } from "./errors.js";
export { Sandbox, type SandboxOptions } from "./sandbox.js";
export type { ClientOptions } from "./transport.js";
export { verifyWebhook, type VerifyOptions } from "./webhooks.js";
export type { components, operations, paths } from "./api.js";
