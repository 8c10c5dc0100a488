/**
 * kiln's TypeScript SDK: the REST API of kilnd (microVM sandboxes from snapshot images),
 * typed with the types generated from spec/openapi.yaml. Runtime dependencies: none but
 * Node's own fetch (Node 20 or newer).
 */
export * from "./client.js";
export { KilnError } from "./errors.js";
export { Sandbox } from "./sandbox.js";
export { verifyWebhook } from "./webhooks.js";
