// `dmx bench`: times text encoding, one guided denoising step (UNet at batch 2) and VAE decoding on models
// built from a preset with random weights, and reports seconds, GFLOP/s against a measured GEMM peak and
// peak memory. The FLOP model (bench_flops) is analytic, from the same configs the models are built from.
#include <ATen/ATen.h>
#include <sys/resource.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "api/options_util.h"
#include "api/presets.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/memory.h"
#include "core/runtime.h"
#include "core/text.h"
#include "dmx/dmx.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/unet_2d_condition.h"
#include "nn/fused_ops.h"
#include "schedulers/registry.h"

namespace dmx {

namespace {

// ---------------------------------------------------------------------------------------------------
// FLOP model. conv: 2*Cin*Cout*k*k*Hout*Wout; linear: 2*in*out*tokens; attention: 4*N*M*d per head
// (q k^T and probs v). Norms, activations, softmax and additions are not counted.
double conv_flops(double cin, double cout, double k, double hw_out) { return 2 * cin * cout * k * k * hw_out; }
double linear_flops(double in, double out, double tokens) { return 2 * in * out * tokens; }
double attn_flops(double n, double m, double inner) { return 4 * n * m * inner; }

double resnet_flops(double in, double out, double temb, double hw) {
  double f = conv_flops(in, out, 3, hw) + conv_flops(out, out, 3, hw);
  if (temb > 0) f += linear_flops(temb, out, 1);
  if (in != out) f += conv_flops(in, out, 1, hw);
  return f;
}

// Transformer2DModel with one BasicTransformerBlock per layer: proj_in, self-attention, cross-attention over
// m context tokens of width ctx, GEGLU feed-forward (C -> 8C, 4C -> C), proj_out.
double transformer_flops(double c, double n, double m, double ctx, int layers) {
  double block = linear_flops(c, 3 * c, n) + attn_flops(n, n, c) + linear_flops(c, c, n);                      // attn1
  block += linear_flops(c, c, n) + linear_flops(ctx, 2 * c, m) + attn_flops(n, m, c) + linear_flops(c, c, n);  // attn2
  block += linear_flops(c, 8 * c, n) + linear_flops(4 * c, c, n);                                              // ff
  return linear_flops(c, c, n) * 2 + layers * block;
}

double unet_flops(const models::UNet2DConditionConfig& u, double h, double w, double ctx_tokens) {
  const auto& ch = u.block_out_channels;
  const size_t nb = ch.size();
  const double temb = u.time_embed_dim(), ctx = u.cross_attention_dim;
  const int tl = u.transformer_layers_per_block, lpb = u.layers_per_block;
  double f = linear_flops(ch[0], temb, 1) + linear_flops(temb, temb, 1);
  f += conv_flops(u.in_channels, ch[0], 3, h * w);
  std::vector<double> skips{static_cast<double>(ch[0])};
  double c = ch[0];
  for (size_t i = 0; i < nb; ++i) {
    const bool attn = u.down_block_types[i].rfind("CrossAttn", 0) == 0;
    for (int l = 0; l < lpb; ++l) {
      f += resnet_flops(c, ch[i], temb, h * w);
      c = ch[i];
      if (attn) f += transformer_flops(c, h * w, ctx_tokens, ctx, tl);
      skips.push_back(c);
    }
    if (i + 1 < nb) {
      h = std::ceil(h / 2), w = std::ceil(w / 2);
      f += conv_flops(c, c, 3, h * w);
      skips.push_back(c);
    }
  }
  f += 2 * resnet_flops(c, c, temb, h * w) + transformer_flops(c, h * w, ctx_tokens, ctx, tl);  // mid block
  for (size_t i = 0; i < nb; ++i) {
    const double out = ch[nb - 1 - i];
    const bool attn = u.up_block_types[i].rfind("CrossAttn", 0) == 0;
    for (int l = 0; l <= lpb; ++l) {
      const double skip = skips.back();
      skips.pop_back();
      f += resnet_flops(c + skip, out, temb, h * w);
      c = out;
      if (attn) f += transformer_flops(c, h * w, ctx_tokens, ctx, tl);
    }
    if (i + 1 < nb) {
      h *= 2, w *= 2;
      f += conv_flops(c, c, 3, h * w);
    }
  }
  return f + conv_flops(c, u.out_channels, 3, h * w);
}

double vae_decode_flops(const models::AutoencoderKLConfig& v, double h, double w) {
  const auto& ch = v.block_out_channels;
  const size_t nb = ch.size();
  double c = ch[nb - 1];
  double f = conv_flops(v.latent_channels, v.latent_channels, 1, h * w) + conv_flops(v.latent_channels, c, 3, h * w);
  f += 2 * resnet_flops(c, c, 0, h * w);
  if (v.mid_block_add_attention) f += linear_flops(c, 4 * c, h * w) + attn_flops(h * w, h * w, c);
  for (size_t i = 0; i < nb; ++i) {
    const double out = ch[nb - 1 - i];
    for (int l = 0; l <= v.layers_per_block; ++l) {
      f += resnet_flops(c, out, 0, h * w);
      c = out;
    }
    if (i + 1 < nb) {
      h *= 2, w *= 2;
      f += conv_flops(c, c, 3, h * w);
    }
  }
  return f + conv_flops(c, v.out_channels, 3, h * w);
}

double clip_flops(const models::CLIPTextConfig& t, double batch) {
  const double n = t.max_position_embeddings, d = t.hidden_size;
  const double layer = linear_flops(d, 4 * d, n) + attn_flops(n, n, d) + 2 * linear_flops(d, t.intermediate_size, n);
  return batch * t.num_hidden_layers * layer;
}

// ---------------------------------------------------------------------------------------------------
at::ScalarType parse_dtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return at::kFloat;
  if (s == "bf16" || s == "bfloat16") return at::kBFloat16;
  if (s == "fp16" || s == "float16") return at::kHalf;
  throw InvalidArgument("--dtype must be one of fp32, bf16, fp16, got '" + s + "'");
}

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Forces completion of asynchronous (CUDA) work before the clock is read; a no-op cost on CPU.
void sync(const at::Tensor& t) {
  if (t.defined() && !t.device().is_cpu()) (void)t.sum().item<double>();
}

// Process CPU time (user + system, all threads), seconds: on a shared machine the wall time includes the
// time other processes hold the cores, CPU time much less so (it still includes their cache pollution).
double cpu_s() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// Median wall seconds of `runs` runs after `warmup`; *cpu gets the median CPU seconds.
template <class F>
double time_median(int warmup, int runs, F&& f, double* cpu) {
  for (int i = 0; i < warmup; ++i) sync(f());
  std::vector<double> t, c;
  for (int i = 0; i < runs; ++i) {
    const double t0 = now_s(), c0 = cpu_s();
    sync(f());
    t.push_back(now_s() - t0);
    c.push_back(cpu_s() - c0);
  }
  *cpu = median(c);
  return median(t);
}

double peak_rss_mb() { return static_cast<double>(process_peak_rss_bytes()) / (1024.0 * 1024.0); }

double matmul_peak_gflops(at::ScalarType dtype, const at::Device& dev) {
  const int64_t n = 2048;
  at::Tensor a = at::randn({n, n}, at::TensorOptions().dtype(at::kFloat)).to(dev, dtype);
  at::Tensor b = at::randn({n, n}, at::TensorOptions().dtype(at::kFloat)).to(dev, dtype);
  at::Tensor c = at::empty({n, n}, a.options());
  sync(at::mm_out(c, a, b));
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const double t0 = now_s();
    sync(at::mm_out(c, a, b));
    best = std::min(best, now_s() - t0);
  }
  return 2.0 * n * n * n / best / 1e9;
}

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// The whole-picture figure: `dmx generate` in-process, each run from loading the model folder to the written PNG,
// into a temporary folder removed afterwards. The first (warm-up) runs also fill the OS page cache: "load" is the
// model read and built in this process each run, not a read from a cold disk.
void bench_whole_picture(const BenchOptions& o, BenchResult& r) {
  GenerateOptions g;
  g.model = o.picture_model;
  g.prompt = o.picture_prompt;
  g.scheduler = o.picture_scheduler;
  g.steps = o.picture_steps;
  g.guidance_scale = o.picture_guidance;
  g.seed = 1;
  g.dtype = o.dtype;
  g.device = o.device;
  g.threads = o.threads;
  g.progress = false;
  g.overwrite = true;
  if (!o.picture_lora.empty()) g.loras.push_back(o.picture_lora);
  if (!o.picture_controlnet.empty()) {
    g.controlnets.push_back(o.picture_controlnet);
    g.control_images.push_back(o.picture_control_image);
  }
  if (!o.picture_adapter.empty()) {
    g.adapters.push_back(o.picture_adapter);
    g.adapter_images.push_back(o.picture_control_image);
  }
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("dmx-bench-picture-" + std::to_string(getpid()))).string();
  std::filesystem::create_directories(dir);
  struct Cleanup {
    std::string d;
    ~Cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(d, ec);
    }
  } cleanup{dir};
  g.output = join_path(dir, "picture.png");
  double cpu = 0;
  r.picture_s = time_median(
      o.warmup, o.runs,
      [&] {
        (void)generate(g);
        return at::Tensor();
      },
      &cpu);
  r.picture_cpu_s = cpu;
  const Image img = load_image(g.output, "the bench picture");
  r.picture_width = img.width;
  r.picture_height = img.height;
  r.picture_model = o.picture_model;
  r.picture_scheduler = o.picture_scheduler;
  r.picture_steps = o.picture_steps;
  r.picture_guidance = o.picture_guidance;
  r.picture_lora = o.picture_lora;
  r.picture_controlnet = o.picture_controlnet;
  r.picture_adapter = o.picture_adapter;
}

}  // namespace

BenchFlops bench_flops(const std::string& preset, int width, int height) {
  const ModelPreset p = model_preset(preset);
  if (width == 0) width = p.native_size;
  if (height == 0) height = p.native_size;
  const int f = p.vae.downscale_factor();
  DMX_CHECK_ARG(width > 0 && height > 0 && width % f == 0 && height % f == 0, "--width and --height must be positive ",
                "multiples of ", f, ", got ", width, "x", height);
  BenchFlops r;
  const double h = height / f, w = width / f;
  r.text_encode = clip_flops(p.text, 2);
  r.unet_pass = unet_flops(p.unet, h, w, p.text.max_position_embeddings);
  r.unet_step = 2 * r.unet_pass;
  r.vae_decode = vae_decode_flops(p.vae, h, w);
  return r;
}

BenchResult bench(const BenchOptions& o) {
  BenchResult r;
  r.preset = o.preset;
  r.flops = bench_flops(o.preset, o.width, o.height);  // validates preset and size
  ModelPreset p = model_preset(o.preset);
  r.width = o.width ? o.width : p.native_size;
  r.height = o.height ? o.height : p.native_size;
  DMX_CHECK_ARG(o.runs >= 1 && o.runs <= 1000, "--runs must be in [1, 1000], got ", o.runs);
  DMX_CHECK_ARG(o.warmup >= 0 && o.warmup <= 100, "warmup must be in [0, 100], got ", o.warmup);
  api::check_device(o.device);
  const at::ScalarType dtype = parse_dtype(o.dtype);
  if (!o.picture_model.empty()) {
    DMX_CHECK_ARG(path_exists(o.picture_model), "--picture-model: '", o.picture_model, "' does not exist");
    DMX_CHECK_ARG(!schedulers::sampler_label(o.picture_scheduler).empty(), "--picture-scheduler must be one of ",
                  join(scheduler_names(), ", "), ", got '", o.picture_scheduler, "'");
    DMX_CHECK_ARG(o.picture_steps >= 1 && o.picture_steps <= 1000, "--picture-steps must be in [1, 1000], got ",
                  o.picture_steps);
    DMX_CHECK_ARG(std::isfinite(o.picture_guidance) && o.picture_guidance >= 0 && o.picture_guidance <= 100,
                  "--picture-guidance must be in [0, 100], got ", o.picture_guidance);
    const bool conditioned = !o.picture_controlnet.empty() || !o.picture_adapter.empty();
    DMX_CHECK_ARG(conditioned == !o.picture_control_image.empty(),
                  "--picture-control-image is needed with --picture-controlnet or --picture-adapter, and only then");
    if (conditioned)
      DMX_CHECK_ARG(path_exists(o.picture_control_image), "--picture-control-image: '", o.picture_control_image,
                    "' does not exist");
  }
  if (!o.profile.empty()) {
    api::OutputPlan plan(o.overwrite);
    plan.file(o.profile + ".unet.json", "--profile (its .unet.json)");
    plan.file(o.profile + ".vae.json", "--profile (its .vae.json)");
    plan.prepare();
  }
  const at::Device dev(o.device);
  if (dtype == at::kHalf && dev.is_cpu())
    throw Unsupported("--dtype fp16 is for CUDA (libtorch 1.13 has no fp16 CPU convolutions); use bf16 on CPU");
  configure_threads(o.threads);
  struct LayoutGuard {
    bool prev = channels_last();
    ~LayoutGuard() { set_channels_last(prev); }
  } layout_guard;
  set_channels_last(o.channels_last);
  // float32 runs NCHW (nn::to_compute_layout), except the VAE decode where the fused GroupNorm is available
  // (models/autoencoder_kl.cpp decode_layout; DMX_VAE_FP32_NHWC=0 turns it off).
  r.channels_last = o.channels_last && dtype != at::kFloat;
  r.dtype = o.dtype;
  r.device = o.device;
  r.threads = runtime_threads();
  r.runs = o.runs;
  r.omp_wait_policy = env_or_empty("OMP_WAIT_POLICY");
  r.omp_proc_bind = env_or_empty("OMP_PROC_BIND");

  at::manual_seed(0);
  const double t_build = now_s();
  models::CLIPTextModel text{nullptr};
  models::UNet2DConditionModel unet{nullptr};
  models::AutoencoderKL vae{nullptr};
  {
    at::NoGradGuard no_grad;
    DefaultDtypeGuard guard(dev.is_cpu() ? dtype : at::kFloat);
    text = models::CLIPTextModel(p.text);
    unet = models::UNet2DConditionModel(p.unet);
    vae = models::AutoencoderKL(p.vae);
  }
  for (torch::nn::Module* m : {static_cast<torch::nn::Module*>(text.get()), static_cast<torch::nn::Module*>(unet.get()),
                               static_cast<torch::nn::Module*>(vae.get())}) {
    m->eval();
    m->to(dev, dtype);
  }
  r.build_s = now_s() - t_build;

  c10::InferenceMode inference;

  const int f = p.vae.downscale_factor();
  const int64_t lh = r.height / f, lw = r.width / f;
  const auto fopts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor ids = at::randint(0, p.text.vocab_size, {2, p.text.max_position_embeddings}, at::kLong).to(dev);
  at::Tensor embeds = text->encode(ids).to(dtype);  // [2, 77, cross_attention_dim]
  at::Tensor latents = at::randn({1, p.unet.in_channels, lh, lw}, fopts).to(dev);
  at::Tensor timestep = at::scalar_tensor(981.0, fopts).to(dev);
  const double guidance = 7.5;

  double text_cpu = 0, unet_cpu = 0, vae_cpu = 0;
  r.text_encode_s = time_median(
      o.warmup, o.runs, [&] { return text->encode(ids); }, &text_cpu);
  // The models are held as `dmx generate` holds them (StableDiffusionParams::release_models): the text encoder
  // is freed after the text encoding and the UNet before the decode, so peak_rss_mb is a generation's peak.
  text = models::CLIPTextModel(nullptr);
  auto unet_step = [&] {
    // One guided step as the pipeline runs it: [uncond, cond] batch, guidance on the float32 result.
    models::UNetInputs in;
    in.sample = at::cat({latents, latents}).to(dtype);
    in.timestep = timestep;
    in.encoder_hidden_states = embeds;
    at::Tensor eps = unet->forward(in).to(at::kFloat);
    auto parts = eps.chunk(2);
    return parts[0] + guidance * (parts[1] - parts[0]);
  };
  r.unet_step_s = time_median(o.warmup, o.runs, unet_step, &unet_cpu);
  // Chrome-trace files of one run each (scripts/profile_summary.py sums the time per op), each written to a
  // temporary and renamed.
  if (!o.profile.empty())
    write_file_atomic(o.profile + ".unet.json", [&](const std::string& tmp) {
      torch::autograd::profiler::RecordProfile guard(tmp);
      sync(unet_step());
    });
  unet = models::UNet2DConditionModel(nullptr);
  at::Tensor z = (latents / p.vae.scaling_factor).to(dtype);
  auto decode = [&] { return vae->decode(z); };
  r.vae_decode_s = time_median(o.warmup, o.runs, decode, &vae_cpu);
  r.text_encode_cpu_s = text_cpu;
  r.unet_step_cpu_s = unet_cpu;
  r.vae_decode_cpu_s = vae_cpu;
  if (!o.profile.empty())
    write_file_atomic(o.profile + ".vae.json", [&](const std::string& tmp) {
      torch::autograd::profiler::RecordProfile guard(tmp);
      sync(decode());
    });
  vae = models::AutoencoderKL(nullptr);  // the whole picture loads its own models
  if (o.measure_peak) r.matmul_peak_gflops = matmul_peak_gflops(dtype, dev);
  if (!o.picture_model.empty()) bench_whole_picture(o, r);
  r.peak_rss_mb = peak_rss_mb();
  return r;
}

// "on" (AVX-512 kernels in use), "off" (DMX_FUSED_KERNELS=0) or "unavailable" (CPU or build without them).
static const char* fused_state() {
  if (!nn::fused_kernels_available()) return "unavailable";
  return fused_kernels() ? "on" : "off";
}

std::string bench_table(const BenchResult& r) {
  char buf[512];
  std::ostringstream s;
  std::snprintf(buf, sizeof buf, "dmx bench: preset %s, %dx%d, %s %s on %s, %d threads, median of %d runs%s%s%s%s\n",
                r.preset.c_str(), r.width, r.height, r.dtype.c_str(), r.channels_last ? "NHWC" : "NCHW",
                r.device.c_str(), r.threads, r.runs,
                r.omp_wait_policy.empty() ? "" : ", OMP_WAIT_POLICY=", r.omp_wait_policy.c_str(),
                r.omp_proc_bind.empty() ? "" : ", OMP_PROC_BIND=", r.omp_proc_bind.c_str());
  s << buf;
  if (r.matmul_peak_gflops > 0) {
    std::snprintf(buf, sizeof buf, "matmul peak (2048^3 %s): %.1f GFLOP/s\n", r.dtype.c_str(), r.matmul_peak_gflops);
    s << buf;
  }
  std::snprintf(buf, sizeof buf, "%-28s %10s %10s %10s %8s\n", "stage", "seconds", "GFLOP", "GFLOP/s", "% peak");
  s << buf;
  auto row = [&](const char* name, double sec, double flop) {
    const double gf = flop / 1e9, rate = sec > 0 ? gf / sec : 0;
    if (r.matmul_peak_gflops > 0)
      std::snprintf(buf, sizeof buf, "%-28s %10.4f %10.2f %10.1f %7.1f%%\n", name, sec, gf, rate,
                    100 * rate / r.matmul_peak_gflops);
    else
      std::snprintf(buf, sizeof buf, "%-28s %10.4f %10.2f %10.1f %8s\n", name, sec, gf, rate, "-");
    s << buf;
  };
  row("text encode (batch 2)", r.text_encode_s, r.flops.text_encode);
  row("unet guided step (batch 2)", r.unet_step_s, r.flops.unet_step);
  row("vae decode (batch 1)", r.vae_decode_s, r.flops.vae_decode);
  std::snprintf(buf, sizeof buf,
                "process CPU seconds (all threads; on a shared machine the wall time above also "
                "counts other processes): text %.4f, unet step %.4f, vae decode %.4f\n",
                r.text_encode_cpu_s, r.unet_step_cpu_s, r.vae_decode_cpu_s);
  s << buf;
  if (r.picture_s > 0) {
    std::snprintf(buf, sizeof buf,
                  "whole picture (load, text encode, %d %s steps, decode, PNG; %dx%d, guidance %g%s%s): %.4f s "
                  "(process CPU %.4f s), %s\n",
                  r.picture_steps, r.picture_scheduler.c_str(), r.picture_width, r.picture_height, r.picture_guidance,
                  r.picture_lora.empty() ? "" : ", LoRA ", r.picture_lora.c_str(), r.picture_s, r.picture_cpu_s,
                  r.picture_model.c_str());
    s << buf;
    if (!r.picture_controlnet.empty()) s << "  with the ControlNet " << r.picture_controlnet << "\n";
    if (!r.picture_adapter.empty()) s << "  with the T2I-Adapter " << r.picture_adapter << "\n";
  } else {
    s << "whole picture: not measured (--picture-model PATH, e.g. models/emoji)\n";
  }
  std::snprintf(buf, sizeof buf, "peak memory (VmHWM): %.0f MiB; model build %.1f s; fused CPU kernels %s\n",
                r.peak_rss_mb, r.build_s, fused_state());
  s << buf;
  return s.str();
}

std::string bench_json(const BenchResult& r) {
  nlohmann::json j;
  j["preset"] = r.preset;
  j["width"] = r.width;
  j["height"] = r.height;
  j["dtype"] = r.dtype;
  j["device"] = r.device;
  j["threads"] = r.threads;
  j["runs"] = r.runs;
  j["layout"] = r.channels_last ? "nhwc" : "nchw";
  j["omp_wait_policy"] = r.omp_wait_policy;
  j["omp_proc_bind"] = r.omp_proc_bind;
  j["text_encode_s"] = r.text_encode_s;
  j["unet_step_s"] = r.unet_step_s;
  j["vae_decode_s"] = r.vae_decode_s;
  j["text_encode_cpu_s"] = r.text_encode_cpu_s;
  j["unet_step_cpu_s"] = r.unet_step_cpu_s;
  j["vae_decode_cpu_s"] = r.vae_decode_cpu_s;
  j["text_encode_gflop"] = r.flops.text_encode / 1e9;
  j["unet_step_gflop"] = r.flops.unet_step / 1e9;
  j["vae_decode_gflop"] = r.flops.vae_decode / 1e9;
  j["matmul_peak_gflops"] = r.matmul_peak_gflops;
  j["build_s"] = r.build_s;
  j["peak_rss_mb"] = r.peak_rss_mb;
  j["fused_kernels"] = fused_state();
  if (r.picture_s > 0) {
    j["picture_s"] = r.picture_s;
    j["picture_cpu_s"] = r.picture_cpu_s;
    j["picture_model"] = r.picture_model;
    j["picture_scheduler"] = r.picture_scheduler;
    j["picture_steps"] = r.picture_steps;
    j["picture_guidance"] = r.picture_guidance;
    j["picture_lora"] = r.picture_lora;
    j["picture_controlnet"] = r.picture_controlnet;
    j["picture_adapter"] = r.picture_adapter;
    j["picture_width"] = r.picture_width;
    j["picture_height"] = r.picture_height;
  }
  return j.dump();
}

}  // namespace dmx
