#include "hub.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <thread>

#include "../cann_abi.h"
#include "../numerics.h"

namespace jax_wqmm::emu {
namespace {

constexpr uint32_t kJoin = 0x4e4a5157, kJoined = 0x4b4f5157, kReduce = 0x44525157, kResult = 0x53525157;

using Clock = std::chrono::steady_clock;

int64_t MsLeft(Clock::time_point deadline) {
  return std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
}

// Sends / receives exactly n bytes before the deadline; false on error, close or timeout.
bool SendAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
    if (k <= 0) return false;
    c += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool RecvAll(int fd, void* p, size_t n, Clock::time_point deadline) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    int r = poll(&pfd, 1, static_cast<int>(std::min<int64_t>(MsLeft(deadline), 1 << 30)));
    if (r <= 0) return false;
    ssize_t k = recv(fd, c, n, 0);
    if (k <= 0) return false;
    c += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

std::string GroupName(const std::string& id) { return "emu_hccl_" + id; }

// ------------------------------------------------------------------ the hub (one thread)

struct Hub {
  int listen_fd = -1;
  int nranks = 0;  // from the first join
  int64_t timeout_ms = 30000;
  std::string id;
  std::vector<int> fds;     // per rank, -1 until joined, -2 after its connection closed
  bool all_joined = false;
  Clock::time_point start = Clock::now();
  // the current all-reduce round
  uint64_t gen = 0;
  int32_t dtype = 0;
  std::vector<std::vector<float>> parts;
  std::vector<bool> arrived;
  bool pending = false;
  Clock::time_point round_start;

  void Reply(int rank, const std::string& error, const std::vector<float>* sum) {
    if (fds[rank] < 0) return;
    uint32_t head[2] = {kResult, error.empty() ? 0u : 1u};
    uint64_t count = error.empty() ? sum->size() : error.size();
    bool ok = SendAll(fds[rank], head, sizeof(head)) && SendAll(fds[rank], &count, sizeof(count));
    if (ok) ok = error.empty() ? SendAll(fds[rank], sum->data(), count * sizeof(float)) : SendAll(fds[rank], error.data(), count);
  }

  std::string Missing() const {
    std::ostringstream s;
    for (int r = 0; r < nranks; ++r) {
      if (!arrived[r]) s << " " << r;
    }
    return s.str();
  }

  // Once every live rank has arrived, a round missing ranks whose connections closed fails
  // (naming them) instead of waiting for the timeout.
  void CheckRound() {
    if (!pending) return;
    bool live_all = true, complete = true;
    std::string gone;
    for (int r = 0; r < nranks; ++r) {
      if (arrived[r]) continue;
      complete = false;
      if (fds[r] == -2) gone += " " + std::to_string(r);
      else live_all = false;
    }
    if (complete) Complete();
    else if (live_all) FailRound("failed: the process of ranks" + gone + " is gone");
  }

  void FailRound(const std::string& why) {
    std::string msg = "all-reduce on group " + GroupName(id) + " " + why + "; ranks that never arrived:" + Missing();
    for (int r = 0; r < nranks; ++r) {
      if (arrived[r]) Reply(r, msg, nullptr);
    }
    pending = false;
  }

  void Complete() {
    std::vector<float> sum;
    if (!SumRanks(parts, dtype, &sum)) {
      FailRound("failed: ranks disagree on the element count");
      return;
    }
    for (int r = 0; r < nranks; ++r) Reply(r, "", &sum);
    pending = false;
  }

  // One message from `fd`: a rank's (rank >= 0), or a connection that has not joined yet.
  void Read(int fd, int rank, std::vector<int>& unjoined) {
    auto forget = [&] { unjoined.erase(std::find(unjoined.begin(), unjoined.end(), fd)); };
    uint32_t magic = 0;
    auto deadline = Clock::now() + std::chrono::milliseconds(2000);
    if (!RecvAll(fd, &magic, 4, deadline)) {  // closed: a process went away
      close(fd);
      if (rank >= 0) {
        fds[rank] = -2;
        CheckRound();
      } else {
        forget();
      }
      return;
    }
    if (magic == kJoin && rank < 0) {
      uint32_t body[2];
      if (!RecvAll(fd, body, sizeof(body), deadline)) return;
      if (nranks == 0) {
        nranks = static_cast<int>(body[1]);
        fds.assign(nranks, -1);
        parts.assign(nranks, {});
        arrived.assign(nranks, false);
      }
      forget();
      if (static_cast<int>(body[0]) >= nranks || fds[body[0]] != -1 || static_cast<int>(body[1]) != nranks) {
        close(fd);
        return;
      }
      fds[body[0]] = fd;
      bool all = true;
      for (int f : fds) all = all && f >= 0;
      if (all) {
        all_joined = true;
        for (int f : fds) SendAll(f, &kJoined, 4);
      }
      return;
    }
    if (magic == kReduce && rank >= 0) {
      struct { int32_t dtype; uint32_t pad; uint64_t gen, count; } head;
      if (!RecvAll(fd, &head, sizeof(head), deadline)) return;
      std::vector<float> data(head.count);
      if (!RecvAll(fd, data.data(), head.count * sizeof(float), deadline)) return;
      if (pending && head.gen != gen) {  // a late rank of an earlier, failed round
        Reply(rank, "all-reduce on group " + GroupName(id) + ": rank " + std::to_string(rank) +
                        " is out of step with the others (an earlier round failed)", nullptr);
        return;
      }
      if (!pending) {
        pending = true;
        gen = head.gen;
        dtype = head.dtype;
        std::fill(arrived.begin(), arrived.end(), false);
        round_start = Clock::now();
      }
      parts[rank] = std::move(data);
      arrived[rank] = true;
      CheckRound();
    }
  }

  void Run() {
    std::vector<int> unjoined;
    while (true) {
      std::vector<pollfd> pfds;
      pfds.push_back({listen_fd, POLLIN, 0});
      for (int f : unjoined) pfds.push_back({f, POLLIN, 0});
      for (int f : fds) pfds.push_back({f >= 0 ? f : -1, POLLIN, 0});
      const size_t nu = unjoined.size();
      poll(pfds.data(), pfds.size(), 50);
      std::vector<std::pair<int, int>> ready;  // (fd, rank or -1)
      for (size_t i = 1; i < pfds.size(); ++i) {
        if (pfds[i].fd < 0 || !(pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const size_t u = i - 1;
        ready.emplace_back(pfds[i].fd, u < nu ? -1 : static_cast<int>(u - nu));
      }
      for (auto [fd, rank] : ready) Read(fd, rank, unjoined);
      if (pfds[0].revents & POLLIN) {
        int c = accept(listen_fd, nullptr, nullptr);
        if (c >= 0) {
          int one = 1;
          setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          unjoined.push_back(c);
        }
      }
      if (pending && Clock::now() - round_start > std::chrono::milliseconds(timeout_ms)) {
        FailRound("timed out after " + std::to_string(timeout_ms) + " ms");
      }
      bool done = all_joined;
      for (int f : fds) done = done && f == -2;
      const bool abandoned = !all_joined && Clock::now() - start > std::chrono::milliseconds(4 * timeout_ms + 60000);
      if (done || abandoned) break;
    }
    for (int f : unjoined) close(f);
    for (int f : fds) {
      if (f >= 0) close(f);
    }
    close(listen_fd);
  }
};

}  // namespace

bool SumRanks(const std::vector<std::vector<float>>& parts, int32_t dtype, std::vector<float>* sum) {
  sum->assign(parts.empty() ? 0 : parts[0].size(), 0.0f);
  for (const auto& part : parts) {
    if (part.size() != sum->size()) return false;
    for (size_t i = 0; i < sum->size(); ++i) (*sum)[i] += part[i];
  }
  if (dtype == ACL_FLOAT16 || dtype == ACL_BF16) {
    for (float& v : *sum) v = RoundOut(dtype == ACL_FLOAT16, v);
  }
  return true;
}

bool IsHubId(const std::string& id) { return id.rfind("hub:", 0) == 0; }

std::string StartHub(int64_t timeout_ms, std::string* error) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 128) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    *error = std::string("HcclGetRootInfo: cannot listen on 127.0.0.1: ") + std::strerror(errno);
    if (fd >= 0) close(fd);
    return "";
  }
  std::random_device rd;
  std::ostringstream id;
  id << "hub:" << ntohs(addr.sin_port) << ":" << std::hex << ((uint64_t{rd()} << 32) ^ rd() ^ getpid());
  auto* hub = new Hub;  // owned by its thread
  hub->listen_fd = fd;
  hub->timeout_ms = timeout_ms;
  hub->id = id.str();
  std::thread([hub] {
    hub->Run();
    delete hub;
  }).detach();
  return id.str();
}

std::unique_ptr<HubRank> HubRank::Join(const std::string& id, int rank, int nranks, int64_t timeout_ms,
                                       std::string* error) {
  int port = 0;
  if (std::sscanf(id.c_str(), "hub:%d:", &port) != 1) {
    *error = "HcclCommInitRootInfo: root info '" + id + "' names no hub";
    return nullptr;
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    *error = "HcclCommInitRootInfo: the hub of root info " + id + " is not there (" + std::strerror(errno) +
             "): root info from an earlier run, or its process exited";
    if (fd >= 0) close(fd);
    return nullptr;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  uint32_t msg[3] = {kJoin, static_cast<uint32_t>(rank), static_cast<uint32_t>(nranks)};
  uint32_t reply = 0;
  if (!SendAll(fd, msg, sizeof(msg)) ||
      !RecvAll(fd, &reply, 4, Clock::now() + std::chrono::milliseconds(timeout_ms)) || reply != kJoined) {
    *error = "HcclCommInitRootInfo: timed out after " + std::to_string(timeout_ms) + " ms waiting for the other ranks of " +
             GroupName(id);
    close(fd);
    return nullptr;
  }
  return std::unique_ptr<HubRank>(new HubRank(fd, rank));
}

HubRank::~HubRank() { close(fd_); }

std::string HubRank::AllReduce(int32_t dtype, std::vector<float>* data, int64_t timeout_ms) {
  uint32_t magic = kReduce;  // then {dtype, pad, gen, count}, as the hub reads them
  struct { int32_t dtype; uint32_t pad; uint64_t gen, count; } body{dtype, 0, generation_++, data->size()};
  if (!SendAll(fd_, &magic, 4) || !SendAll(fd_, &body, sizeof(body)) ||
      !SendAll(fd_, data->data(), data->size() * sizeof(float))) {
    return "all-reduce: the group's hub is gone (the process that made the root info exited)";
  }
  // the hub answers within its own timeout; wait a little longer for it
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms + 5000);
  uint32_t rhead[2];
  uint64_t count = 0;
  if (!RecvAll(fd_, rhead, sizeof(rhead), deadline) || rhead[0] != kResult || !RecvAll(fd_, &count, 8, deadline)) {
    return "all-reduce: no answer from the group's hub (the process that made the root info exited?)";
  }
  if (rhead[1] != 0) {
    std::string msg(count, '\0');
    RecvAll(fd_, msg.data(), count, deadline);
    return msg;
  }
  if (count != data->size() || !RecvAll(fd_, data->data(), count * sizeof(float), deadline)) {
    return "all-reduce: a short answer from the group's hub";
  }
  return "";
}

}  // namespace jax_wqmm::emu
