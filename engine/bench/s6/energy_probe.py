#!/usr/bin/env python3
"""Samples NVML's total-energy counter (mJ) and the SM clock every ~1 ms while a command runs, then reports the
card's mean power over the longest stretch of throttled clock (the back-to-back prefills at the power cap).

Usage: energy_probe.py OUT.csv -- COMMAND ...
"""
import ctypes, subprocess, sys, threading, time

out, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
nvml = ctypes.CDLL("libnvidia-ml.so.1")
assert nvml.nvmlInit_v2() == 0
h = ctypes.c_void_p()
assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h)) == 0
e, clk, pw = ctypes.c_ulonglong(), ctypes.c_uint(), ctypes.c_uint()
samples, done = [], threading.Event()

def poll():
    while not done.is_set():
        nvml.nvmlDeviceGetTotalEnergyConsumption(h, ctypes.byref(e))
        nvml.nvmlDeviceGetClockInfo(h, 1, ctypes.byref(clk))  # NVML_CLOCK_SM
        nvml.nvmlDeviceGetPowerUsage(h, ctypes.byref(pw))
        samples.append((time.perf_counter(), e.value, clk.value, pw.value))
        time.sleep(0.001)

t = threading.Thread(target=poll)
t.start()
p = subprocess.run(cmd, capture_output=True, text=True)
done.set()
t.join()
sys.stdout.write(p.stdout)
with open(out, "w") as f:
    f.write("t_s,energy_mj,sm_clock_mhz,power_mw\n")
    for s in samples:
        f.write(f"{s[0]:.6f},{s[1]},{s[2]},{s[3]}\n")
# Longest run of samples below 1900 MHz (throttled).
best, start = (0, 0), None
for i, s in enumerate(samples + [(0, 0, 9999, 0)]):
    if s[2] < 1900 and start is None:
        start = i
    elif s[2] >= 1900 and start is not None:
        if i - start > best[1] - best[0]:
            best = (start, i)
        start = None
a, b = samples[best[0]], samples[best[1] - 1]
dt, de = b[0] - a[0], (b[1] - a[1]) / 1e3
clocks = sorted(s[2] for s in samples[best[0]:best[1]])
distinct = len(set(s[1] for s in samples[best[0]:best[1]]))
print(f"energy probe: {len(samples)} samples; longest throttled stretch {dt * 1e3:.0f} ms, {de:.2f} J -> "
      f"mean power {de / dt if dt > 0 else float('nan'):.0f} W, SM clock median {clocks[len(clocks) // 2] if clocks else 0} MHz; "
      f"{distinct} distinct energy readings in it")
sys.exit(p.returncode)
