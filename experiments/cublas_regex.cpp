// What torch's reading of CUBLAS_WORKSPACE_CONFIG costs the host. As torch's source reads
// (aten/src/ATen/cuda/CublasHandlePool.cpp at commit 26a3905, parseChosenWorkspaceSize), it works out cuBLAS's
// workspace size on every cuBLAS call by matching the variable's value against a std::regex that it builds anew each
// time. This times the same work on ilora.py's value.
//   g++ -O2 -o /tmp/cublas_regex experiments/cublas_regex.cpp && /tmp/cublas_regex
#include <chrono>
#include <cstdio>
#include <regex>
#include <string>

// ":SIZE_KIB:COUNT" pairs -> bytes, with a pattern built for this call alone
static size_t workspace_bytes(const std::string& value) {
  const std::regex pair(":([0-9]+):([0-9]+)");
  size_t bytes = 0;
  for (std::sregex_iterator it(value.begin(), value.end(), pair), end; it != end; ++it) {
    bytes += std::stoull((*it)[1].str()) * 1024 * std::stoull((*it)[2].str());
  }
  return bytes;
}

int main() {
  const std::string value = ":4096:8";
  const int calls = 20000;
  size_t total = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) total += workspace_bytes(value);
  const std::chrono::duration<double, std::micro> spent = std::chrono::steady_clock::now() - start;
  std::printf("%.1f us a parse; %zu bytes\n", spent.count() / calls, total / calls);
}
