// Routing buffers shared by route_topk.wgsl and route_switch.wgsl. Assignments are token-major, k per token:
// a_expert (NONE for padding), a_weight, a_info (choice rank, plus DROPPED when capacity dropped it). Within a
// token the k assignments are stored in ascending expert order, the combine order.

@group(0) @binding(1) var<storage, read> r_logits: array<f32>;
@group(0) @binding(3) var<storage, read> r_pad: array<u32>;
@group(0) @binding(4) var<storage, read_write> a_expert: array<u32>;
@group(0) @binding(5) var<storage, read_write> a_weight: array<f32>;
@group(0) @binding(6) var<storage, read_write> a_info: array<u32>;
