import sys, numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
for k in a.files:
    if a[k].tobytes() != b[k].tobytes():
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        print(f"{k:40s} max rel diff {np.nanmax(np.abs(x - y) / np.maximum(np.abs(x), 1e-30)):.3g}")
