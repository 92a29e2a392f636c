#include "cann_library.h"

#include <dlfcn.h>

#include <sstream>

namespace jax_wqmm {

std::string CannApi::RecentErrorMessage() const {
  if (aclGetRecentErrMsg == nullptr) return "";
  const char* msg = aclGetRecentErrMsg();
  return msg ? std::string(msg) : std::string();
}

CannLibrary& CannLibrary::Get() {
  static CannLibrary* lib = new CannLibrary();  // never destroyed: handlers may run at exit
  return *lib;
}

std::string CannApi::EnsureDevice(int32_t device) const {
  int32_t current = -1;
  if (aclrtGetDevice(&current) == 0 && current == device) return "";
  aclError e = aclrtSetDevice(device);
  if (e != 0) {
    std::string detail = RecentErrorMessage();
    return "aclrtSetDevice(" + std::to_string(device) + ") returned " + std::to_string(e) +
           (detail.empty() ? "" : ": " + detail);
  }
  return "";
}

namespace {

struct Symbol {
  const char* role;
  const char* name;
  void** slot;
  bool required;
};

// Candidate paths of one file name: in each directory, then on the loader's default path.
std::vector<std::string> Candidates(const std::string& name, const std::vector<std::string>& dirs) {
  if (name.find('/') != std::string::npos) return {name};
  std::vector<std::string> out;
  for (const auto& d : dirs) {
    if (!d.empty()) out.push_back(d + "/" + name);
  }
  out.push_back(name);  // the loader's default search path
  return out;
}

void* Open(const std::string& path, bool bare, std::ostringstream& tried) {
  dlerror();
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* err = dlerror();
    tried << "    " << path << (bare ? " (loader default path)" : "") << ": "
          << (err ? err : "not found") << "\n";
  }
  return h;
}

bool IsBare(const std::string& path) { return path.find('/') == std::string::npos; }

}  // namespace

LoadedCann::~LoadedCann() {
  for (void* h : handles) dlclose(h);
}

std::string CannLibrary::Load(const std::vector<std::string>& dirs,
                              const std::map<std::string, std::vector<std::string>>& names) {
  std::lock_guard<std::mutex> lock(mu_);
  current_.reset();
  auto lib = std::make_shared<LoadedCann>();
  CannApi& api = lib->api;

  const Symbol symbols[] = {
      {"nnopbase", "aclCreateTensor", reinterpret_cast<void**>(&api.aclCreateTensor), true},
      {"nnopbase", "aclDestroyTensor", reinterpret_cast<void**>(&api.aclDestroyTensor), true},
      {"opapi", "aclnnWeightQuantMatmulAllReduceGetWorkspaceSize",
       reinterpret_cast<void**>(&api.GetWorkspaceSize), true},
      {"opapi", "aclnnWeightQuantMatmulAllReduce", reinterpret_cast<void**>(&api.Run), true},
      {"ascendcl", "aclrtGetDevice", reinterpret_cast<void**>(&api.aclrtGetDevice), true},
      {"ascendcl", "aclrtSetDevice", reinterpret_cast<void**>(&api.aclrtSetDevice), true},
      {"ascendcl", "aclGetRecentErrMsg", reinterpret_cast<void**>(&api.aclGetRecentErrMsg), false},
      {"ascendcl", "aclrtGetSocName", reinterpret_cast<void**>(&api.aclrtGetSocName), false},
      {"hccl", "HcclGetCommName", reinterpret_cast<void**>(&api.HcclGetCommName), true},
      {"hccl", "HcclCommInitAll", reinterpret_cast<void**>(&api.HcclCommInitAll), true},
      {"hccl", "HcclGetRootInfo", reinterpret_cast<void**>(&api.HcclGetRootInfo), true},
      {"hccl", "HcclCommInitRootInfo", reinterpret_cast<void**>(&api.HcclCommInitRootInfo), true},
      {"hccl", "HcclCommDestroy", reinterpret_cast<void**>(&api.HcclCommDestroy), true},
  };
  auto role_symbols = [&](const std::string& role) {
    std::vector<const Symbol*> out;
    for (const auto& s : symbols) {
      if (role == s.role) out.push_back(&s);
    }
    return out;
  };

  std::ostringstream report;
  bool ok = true;
  for (const auto& role : LibraryRoles()) {
    auto it = names.find(role);
    if (it == names.end() || it->second.empty()) {
      report << "  " << role << ": no library name configured\n";
      ok = false;
      continue;
    }
    const std::vector<std::string>& files = it->second;
    std::ostringstream tried;
    // (handle, path) of the files this role's symbols are taken from, in priority order.
    std::vector<std::pair<void*, std::string>> opened;
    if (role == "opapi") {
      // Directory by directory, every name in order; the first file that exports every
      // entry point of the operator wins (torch_npu's order: per-family library first).
      std::vector<std::string> order;
      for (const auto& d : dirs) {
        for (const auto& f : files) {
          if (f.find('/') == std::string::npos && !d.empty()) order.push_back(d + "/" + f);
        }
      }
      for (const auto& f : files) order.push_back(f);  // explicit paths, then the default path
      for (const auto& path : order) {
        void* h = Open(path, IsBare(path), tried);
        if (h == nullptr) continue;
        std::string missing;
        for (const Symbol* s : role_symbols(role)) {
          if (s->required && dlsym(h, s->name) == nullptr) missing += std::string(" ") + s->name;
        }
        if (missing.empty()) {
          opened.emplace_back(h, path);
          break;
        }
        tried << "    " << path << ": loaded, but missing symbol" << missing << "\n";
        dlclose(h);
      }
    } else {
      // Every name that is found; each symbol from the first of them that exports it.
      for (const auto& f : files) {
        for (const auto& path : Candidates(f, dirs)) {
          void* h = Open(path, IsBare(path) && f.find('/') == std::string::npos, tried);
          if (h != nullptr) {
            opened.emplace_back(h, path);
            break;
          }
        }
      }
    }
    std::string joined;
    for (auto& [h, path] : opened) {
      lib->handles.push_back(h);
      joined += (joined.empty() ? "" : ", ") + path;
    }
    if (opened.empty()) {
      report << "  " << role << " (";
      for (size_t i = 0; i < files.size(); ++i) report << (i ? ", " : "") << files[i];
      report << "): not loaded; tried:\n" << tried.str();
      ok = false;
      continue;
    }
    lib->paths[role] = joined;
    for (const Symbol* s : role_symbols(role)) {
      for (auto& [h, path] : opened) {
        dlerror();
        if ((*s->slot = dlsym(h, s->name)) != nullptr) {
          lib->symbol_paths[s->name] = path;
          break;
        }
      }
      if (*s->slot == nullptr && s->required) {
        report << "  missing symbol " << s->name << " in " << joined << " (" << role << ")\n";
        ok = false;
      }
    }
  }
  if (!ok) {
    report_ = report.str();
    return report_;  // ``lib`` closes what it opened
  }
  current_ = std::move(lib);
  report_.clear();
  return "";
}

void CannLibrary::Unload() {
  std::lock_guard<std::mutex> lock(mu_);
  current_.reset();
}

std::shared_ptr<const LoadedCann> CannLibrary::Current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return current_;
}

std::string CannLibrary::report() const {
  std::lock_guard<std::mutex> lock(mu_);
  return report_;
}

}  // namespace jax_wqmm
