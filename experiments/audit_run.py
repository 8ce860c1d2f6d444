import json, sys, time, torch
import wfnet
from wfnet.run import Run
from wfnet import audit
from wfnet.data import labels_of

run = Run.open(sys.argv[1], device="cpu")
torch.set_num_threads(1)
train, val, test = run.data.train, run.data.val, run.data.test
wf = run.wrapped()
orig = run.original_model()
x_test = torch.stack([test[i][0] for i in range(len(test))]); y_test = labels_of(test)
nc = run.num_classes

@torch.no_grad()
def accs(model_fn):
    pred = torch.cat([model_fn(x_test[i:i+512]).argmax(1) for i in range(0, len(x_test), 512)])
    return pred

# hard export thresholds
rows = {}
for T in (None, 0.05, 0.1, 0.25, 0.5, 0.75):
    ar, af, rem = [], [], []
    for c in range(nc):
        m = wfnet.export(wf, forget=c, hard=T).eval()
        p = accs(m)
        f = y_test == c
        af.append((p[f] == c).float().mean().item()); ar.append((p[~f] == y_test[~f]).float().mean().item())
        rem.append(m.wfnet_export["removed_total"] / m.wfnet_export["channels_total"])
    rows[str(T)] = {"acc_r": 100 * sum(ar) / nc, "acc_f": 100 * sum(af) / nc, "removed_frac": sum(rem) / nc}
    print(T, rows[str(T)], flush=True)
json.dump(rows, open("/tmp/hard_thresholds.json", "w"), indent=1)

T = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
base = {}
for meth in run.baseline_methods():
    base[meth] = meth
subjects = [
    audit.AuditSubject("original", lambda c: (orig, lambda m, t: m(t)), skip={"relearn_fewshot"}),
    audit.AuditSubject("WF-Net (row c)", lambda c: (wf, lambda m, t, c=c: m(t, forget=c))),
    audit.AuditSubject(f"WF-Net hard export (T={T})", lambda c: (wfnet.export(wf, forget=c, hard=T).eval(), lambda m, t: m(t))),
]
for meth in run.baseline_methods():
    subjects.append(audit.AuditSubject(meth, lambda c, meth=meth: (run.baseline_model(meth, c), lambda m, t: m(t))))
classes = [c for c in range(nc) if all(c in run.baseline_classes(m) for m in run.baseline_methods())] or list(range(nc))
t0 = time.time()
res = audit.run_audit(subjects, train, val, test, classes, "cpu", shots=(10, 50), steps=50, max_samples=500, progress=False)
res["seconds"] = time.time() - t0
res["hard_thresholds"] = rows
json.dump(res, open("/tmp/audit_demo.json", "w"), indent=1, default=str)
print(audit.audit_markdown(res, "Audit: digits / small_cnn (demo --quick)"))
print("seconds", res["seconds"])
