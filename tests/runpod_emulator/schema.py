"""The part of RunPod's GraphQL schema that the runpod SDK 1.12.0 sends documents against.

Field and input names are the ones the SDK's query and mutation builders use
(``runpod/api/queries/*.py``, ``runpod/api/mutations/pods.py``); a document asking for anything else fails
validation, as it would at RunPod.
"""

from __future__ import annotations

SCHEMA_SDL = """
type Query {
  myself: User
  pod(input: PodFilter): Pod
  gpuTypes(input: GpuTypeFilter): [GpuType]
}

type Mutation {
  podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput): Pod
  podStop(input: PodStopInput): Pod
  podResume(input: PodResumeInput): Pod
  podTerminate(input: PodTerminateInput): Boolean
}

input PodFilter { podId: String! }
input GpuTypeFilter { id: String }
input PodStopInput { podId: String! }
input PodResumeInput { podId: String!, gpuCount: Int }
input PodTerminateInput { podId: String! }
input EnvironmentVariableInput { key: String!, value: String! }
input GpuLowestPriceInput { gpuCount: Int }

enum CloudTypeEnum { ALL SECURE COMMUNITY }
enum PodStatus { CREATED RUNNING RESTARTING EXITED PAUSED DEAD TERMINATED }
enum PodType { INTERRUPTABLE RESERVED BID BACKGROUND }

input PodFindAndDeployOnDemandInput {
  name: String
  imageName: String
  cloudType: CloudTypeEnum
  startSsh: Boolean
  gpuTypeId: String
  supportPublicIp: Boolean
  gpuCount: Int
  volumeInGb: Int
  minVcpuCount: Int
  minMemoryInGb: Int
  allowedCudaVersions: [String]
  dataCenterId: String
  dockerArgs: String
  countryCode: String
  containerDiskInGb: Int
  ports: String
  volumeMountPath: String
  env: [EnvironmentVariableInput]
  templateId: String
  networkVolumeId: String
  minDownload: Int
  minUpload: Int
}

type User {
  id: String
  pubKey: String
  networkVolumes: [NetworkVolume]
  pods: [Pod]
}

type NetworkVolume { id: String, name: String, size: Int, dataCenterId: String }

type Pod {
  id: String!
  containerDiskInGb: Int
  costPerHr: Float
  desiredStatus: PodStatus
  dockerArgs: String
  dockerId: String
  env: [String]
  gpuCount: Int
  imageName: String
  lastStatusChange: String
  machineId: String
  memoryInGb: Float
  name: String
  podType: PodType
  port: Int
  ports: String
  uptimeSeconds: Int
  vcpuCount: Float
  volumeInGb: Float
  volumeMountPath: String
  runtime: PodRuntime
  machine: PodMachineInfo
}

type PodRuntime { uptimeInSeconds: Int, ports: [PodRuntimePorts] }
type PodRuntimePorts { ip: String, isIpPublic: Boolean, privatePort: Int, publicPort: Int, type: String }
type PodMachineInfo { gpuDisplayName: String, podHostId: String }

type LowestPrice { minimumBidPrice: Float, uninterruptablePrice: Float }

type GpuType {
  id: String
  displayName: String
  manufacturer: String
  memoryInGb: Int
  cudaCores: Int
  maxGpuCount: Int
  secureCloud: Boolean
  communityCloud: Boolean
  securePrice: Float
  communityPrice: Float
  oneMonthPrice: Float
  threeMonthPrice: Float
  oneWeekPrice: Float
  communitySpotPrice: Float
  secureSpotPrice: Float
  lowestPrice(input: GpuLowestPriceInput): LowestPrice
}
"""

#: The GPU catalogue the emulator starts with: RunPod's ids, display names, memory, and prices in USD per GPU-hour.
DEFAULT_GPU_TYPES = [
    {
        "id": "NVIDIA A100 80GB PCIe",
        "displayName": "A100 PCIe",
        "memoryInGb": 80,
        "securePrice": 1.64,
        "communityPrice": 1.19,
    },
    {
        "id": "NVIDIA H100 80GB HBM3",
        "displayName": "H100 SXM",
        "memoryInGb": 80,
        "securePrice": 2.99,
        "communityPrice": 2.69,
    },
    {
        "id": "NVIDIA GeForce RTX 4090",
        "displayName": "RTX 4090",
        "memoryInGb": 24,
        "securePrice": 0.69,
        "communityPrice": 0.34,
    },
    {
        "id": "NVIDIA RTX A6000",
        "displayName": "RTX A6000",
        "memoryInGb": 48,
        "securePrice": 0.76,
        "communityPrice": 0.49,
    },
]

#: RunPod's own messages, word for word.
NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. Please refresh and try again."
)
NO_GPUS_ON_HOST = "There are not enough free GPUs on the host machine to start this pod."
GENERIC = "Something went wrong. Please try again later or contact support."
