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

void CannLibrary::CloseLocked() {
  for (void* h : handles_) dlclose(h);
  handles_.clear();
  paths_.clear();
  api_ = CannApi();
  loaded_ = false;
}

std::string CannLibrary::Load(const std::vector<std::string>& dirs,
                              const std::map<std::string, std::string>& names) {
  std::lock_guard<std::mutex> lock(mu_);
  CloseLocked();

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
    handles_.push_back(h);
    by_role[role] = h;
    paths_[role] = path;
  }

  const Symbol symbols[] = {
      {"nnopbase", "aclCreateTensor", reinterpret_cast<void**>(&api_.aclCreateTensor), true},
      {"nnopbase", "aclDestroyTensor", reinterpret_cast<void**>(&api_.aclDestroyTensor), true},
      {"opapi", "aclnnWeightQuantMatmulAllReduceGetWorkspaceSize",
       reinterpret_cast<void**>(&api_.GetWorkspaceSize), true},
      {"opapi", "aclnnWeightQuantMatmulAllReduce", reinterpret_cast<void**>(&api_.Run), true},
      {"ascendcl", "aclGetRecentErrMsg", reinterpret_cast<void**>(&api_.aclGetRecentErrMsg), false},
      {"ascendcl", "aclrtSetDevice", reinterpret_cast<void**>(&api_.aclrtSetDevice), false},
      {"hccl", "HcclGetCommName", reinterpret_cast<void**>(&api_.HcclGetCommName), true},
      {"hccl", "HcclCommInitAll", reinterpret_cast<void**>(&api_.HcclCommInitAll), true},
      {"hccl", "HcclGetRootInfo", reinterpret_cast<void**>(&api_.HcclGetRootInfo), true},
      {"hccl", "HcclCommInitRootInfo", reinterpret_cast<void**>(&api_.HcclCommInitRootInfo), true},
      {"hccl", "HcclCommDestroy", reinterpret_cast<void**>(&api_.HcclCommDestroy), true},
  };
  for (const auto& s : symbols) {
    auto it = by_role.find(s.role);
    if (it == by_role.end()) continue;  // already reported
    dlerror();
    *s.slot = dlsym(it->second, s.name);
    if (*s.slot == nullptr && s.required) {
      report << "  missing symbol " << s.name << " in " << paths_[s.role] << " (" << s.role
             << ")\n";
      ok = false;
    }
  }
  if (!ok) {
    CloseLocked();
    report_ = report.str();
    return report_;
  }
  loaded_ = true;
  report_.clear();
  return "";
}

void CannLibrary::Unload() {
  std::lock_guard<std::mutex> lock(mu_);
  CloseLocked();
}

std::string CannLibrary::report() const {
  std::lock_guard<std::mutex> lock(mu_);
  return report_;
}

std::map<std::string, std::string> CannLibrary::loaded_paths() const {
  std::lock_guard<std::mutex> lock(mu_);
  return paths_;
}

}  // namespace jax_wqmm
