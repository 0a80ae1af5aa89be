"""Does this llama-cpp-python build decode on this machine? Exit 0 if so.

The llm service's own model settings (rma.services.llm.model_settings), loaded the way
llama-cpp-python's server loads them, then a batched prompt and a few generated tokens, in a
worker thread as the server runs them. A build that dies here (a signal) would take the whole
pytest process with it, so .ci/run checks first and rebuilds (see .ci/run).
"""

from __future__ import annotations

import os
import platform
import sys
import threading


def describe() -> None:
    import llama_cpp

    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags")):
                    flags += "    " + line.strip()[:400] + "\n"
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(
        f"llama-cpp-python {llama_cpp.__version__} on {platform.machine()}, "
        f"cpu_count={os.cpu_count()} usable={usable}"
    )
    print(f"    {llama_cpp.llama_print_system_info().decode().strip()}")
    print(flags, end="")


def main() -> int:
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings

    from rma.services.llm import model_settings
    from rma.services.settings import ServiceSettings

    describe()
    settings = ModelSettings(**model_settings(ServiceSettings(llm_n_ctx=2048)))
    llama = LlamaProxy(models=[settings])()
    prompt = "Count the words in this sentence. " * 30  # ~200 tokens: one batched decode
    answers: list[str] = []

    def ask() -> None:
        for question in (prompt, "What is the capital of France?"):
            out = llama.create_chat_completion(
                messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0
            )
            answers.append(str(out["choices"][0]["message"]["content"]))

    worker = threading.Thread(target=ask)
    worker.start()
    worker.join()
    llama.close()
    if len(answers) != 2:
        print("llama smoke: no answer")
        return 1
    print(f"llama smoke: decoded ({answers[1].strip()[:40]!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
