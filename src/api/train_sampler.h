// The Stable Diffusion pipeline as the training layer's text-to-image callback (validation images, DreamBooth
// class images): training depends on loaders and models, and the api layer, which sees both training and
// pipelines, connects them. Internal header of the api layer (tests use it too).
#pragma once
#include "training/trainer.h"

namespace dmx::api {
// txt2img of the request (no progress bar; a ControlNet at scale 1 when the request carries one).
training::SampleImages pipeline_sampler();
}  // namespace dmx::api
