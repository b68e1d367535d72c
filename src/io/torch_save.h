// Writing torch.save files (the zip format of torch >= 1.6) without Python: a pickle writer for plain data and
// tensors, and a zip writer for the archive. What it writes is what torch.save(obj, f) writes for the same
// object, read by `torch.load` and by dmx's own weights-only reader (io/torch_pickle.h):
//   <folder>/data.pkl   the object, pickle protocol 2 (torch.save's DEFAULT_PROTOCOL), every tensor a
//                       _rebuild_tensor_v2 call on a persistent id ('storage', torch.<Type>Storage, key, 'cpu',
//                       numel); each tensor has its own storage, key "0", "1", ... in pickling order
//   <folder>/data/<key> the storage's bytes, little-endian, contiguous
//   <folder>/version    "3\n" (torch's file format version)
// Entries are stored (not compressed), each with a CRC-32, data aligned to 64 bytes by padding in the local
// header's extra field as PyTorchStreamWriter does. <folder> is the output's file stem (torch's choice) when it is
// made of [A-Za-z0-9._-], else "archive". Values: None, bool, int (int64), float (BINFLOAT), str, list, tuple, dict
// (any keys of these kinds, in insertion order), collections.OrderedDict (a state dict), tensors (any dtype with
// a torch storage type; copied contiguous to the CPU). Only the globals torch.save itself writes appear
// (collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch.<Type>Storage), so the file also passes
// weights-only readers, up to their opcode lists: torch 1.13's `weights_only=True` refuses BINFLOAT, which any
// float value needs (as in every A1111 hypernetwork file, whose layer_structure is a list of floats).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace dmx::io {

class PyValue {
 public:
  enum class Kind { None, Bool, Int, Float, String, List, Tuple, Dict, OrderedDict, Tensor };
  PyValue() = default;  // None
  static PyValue none() { return PyValue(); }
  static PyValue boolean(bool b);
  static PyValue integer(int64_t i);
  static PyValue real(double f);
  static PyValue string(std::string s);
  static PyValue list(std::vector<PyValue> items = {});
  static PyValue tuple(std::vector<PyValue> items = {});
  static PyValue dict();
  static PyValue ordered_dict();
  static PyValue tensor(const at::Tensor& t);
  static PyValue reals(const std::vector<double>& v);  // a list of floats

  Kind kind() const { return kind_; }
  // Dicts and OrderedDicts: appends a key/value pair (keys are not checked for duplicates).
  PyValue& set(PyValue key, PyValue value);
  PyValue& set(const std::string& key, PyValue value) { return set(string(key), std::move(value)); }
  // Lists and tuples: appends an element.
  PyValue& append(PyValue item);

  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::vector<PyValue> items;                      // list / tuple elements
  std::vector<std::pair<PyValue, PyValue>> pairs;  // dict / OrderedDict entries
  at::Tensor t;

 private:
  Kind kind_ = Kind::None;
};

// The pickle (protocol 2) of `root` and the tensors it refers to, in storage-key order (key i = storages[i]).
struct PickledObject {
  std::vector<uint8_t> pickle;
  std::vector<at::Tensor> storages;  // contiguous CPU tensors
};
PickledObject pickle_object(const PyValue& root);

// The bytes of a torch.save zip archive of `root`, with `folder` as the archive's top folder.
std::vector<uint8_t> torch_save_bytes(const PyValue& root, const std::string& folder = "archive");
// torch.save(root, path): written to a temporary and renamed (write_bytes_atomic); the folder is path's stem
// when portable, else "archive". IoError / SystemError when it cannot be written.
void torch_save(const PyValue& root, const std::string& path);
// The archive folder torch_save uses for `path`.
std::string torch_save_folder(const std::string& path);
}  // namespace dmx::io
