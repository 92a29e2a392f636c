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

namespace {

struct Symbol {
  const char* role;
  const char* name;
  void** slot;
  bool required;
};

void* OpenRole(const std::string& name, const std::vector<std::string>& dirs,
               std::string* path, std::ostringstream& tried) {
  std::vector<std::string> candidates;
  if (name.find('/') != std::string::npos) {
    candidates.push_back(name);
  } else {
    for (const auto& d : dirs) {
      if (!d.empty()) candidates.push_back(d + "/" + name);
    }
    candidates.push_back(name);  // the loader's default search path
  }
  for (size_t i = 0; i < candidates.size(); ++i) {
    dlerror();
    void* h = dlopen(candidates[i].c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h != nullptr) {
      *path = candidates[i];
      return h;
    }
    const char* err = dlerror();
    bool bare = name.find('/') == std::string::npos && i + 1 == candidates.size();
    tried << "    " << candidates[i] << (bare ? " (loader default path)" : "") << ": "
          << (err ? err : "not found") << "\n";
  }
  return nullptr;
}

}  // namespace

LoadedCann::~LoadedCann() {
  for (void* h : handles) dlclose(h);
}

std::string CannLibrary::Load(const std::vector<std::string>& dirs,
                              const std::map<std::string, std::string>& names) {
  std::lock_guard<std::mutex> lock(mu_);
  current_.reset();
  auto lib = std::make_shared<LoadedCann>();
  CannApi& api = lib->api;

  std::map<std::string, void*> by_role;
  std::ostringstream report;
  bool ok = true;
  for (const auto& role : LibraryRoles()) {
    auto it = names.find(role);
    if (it == names.end()) {
      report << "  " << role << ": no library name configured\n";
      ok = false;
      continue;
    }
    std::ostringstream tried;
    std::string path;
    void* h = OpenRole(it->second, dirs, &path, tried);
    if (h == nullptr) {
      report << "  " << it->second << " (" << role << "): not loaded; tried:\n" << tried.str();
      ok = false;
      continue;
    }
    lib->handles.push_back(h);
    by_role[role] = h;
    lib->paths[role] = path;
  }

  const Symbol symbols[] = {
      {"nnopbase", "aclCreateTensor", reinterpret_cast<void**>(&api.aclCreateTensor), true},
      {"nnopbase", "aclDestroyTensor", reinterpret_cast<void**>(&api.aclDestroyTensor), true},
      {"opapi", "aclnnWeightQuantMatmulAllReduceGetWorkspaceSize",
       reinterpret_cast<void**>(&api.GetWorkspaceSize), true},
      {"opapi", "aclnnWeightQuantMatmulAllReduce", reinterpret_cast<void**>(&api.Run), true},
      {"ascendcl", "aclGetRecentErrMsg", reinterpret_cast<void**>(&api.aclGetRecentErrMsg), false},
      {"ascendcl", "aclrtSetDevice", reinterpret_cast<void**>(&api.aclrtSetDevice), false},
      {"hccl", "HcclGetCommName", reinterpret_cast<void**>(&api.HcclGetCommName), true},
      {"hccl", "HcclCommInitAll", reinterpret_cast<void**>(&api.HcclCommInitAll), true},
      {"hccl", "HcclGetRootInfo", reinterpret_cast<void**>(&api.HcclGetRootInfo), true},
      {"hccl", "HcclCommInitRootInfo", reinterpret_cast<void**>(&api.HcclCommInitRootInfo), true},
      {"hccl", "HcclCommDestroy", reinterpret_cast<void**>(&api.HcclCommDestroy), true},
  };
  for (const auto& s : symbols) {
    auto it = by_role.find(s.role);
    if (it == by_role.end()) continue;  // already reported
    dlerror();
    *s.slot = dlsym(it->second, s.name);
    if (*s.slot == nullptr && s.required) {
      report << "  missing symbol " << s.name << " in " << lib->paths[s.role] << " (" << s.role
             << ")\n";
      ok = false;
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
