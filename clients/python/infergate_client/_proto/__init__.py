"""Generated from proto/ by scripts/gen_protos.py. Do not edit."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
