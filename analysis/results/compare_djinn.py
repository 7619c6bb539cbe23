# Usage: python3 analysis/results/compare_djinn.py analysis/results/shipped-compare.csv
# Per workload and agent count: djinn mean P99 (3 seeds) and completed turns, and the policies that
# beat it (P99 lower by > 0.5% with as many completed turns, or more completed turns).
import csv,sys,collections
rows=list(csv.DictReader(open(sys.argv[1])))
agg=collections.defaultdict(lambda: [0,0,0])
for r in rows:
    k=(r['workload'],r['agents'],r['policy'])
    a=agg[k]; a[0]+=float(r['latency_ms_p99']); a[1]+=int(r['turns_completed']); a[2]+=1
wl=sorted(set((k[0],k[1]) for k in agg))
for w,n in wl:
    pol={k[2]:(v[0]/v[2],v[1]/v[2]) for k,v in agg.items() if k[0]==w and k[1]==n}
    d=pol['djinn']; o=pol.get('oracle',(0,0))
    worse=[(p,round(v[0]),v[1]) for p,v in pol.items() if p not in('djinn','oracle') and ((v[0]<d[0]*0.995 and v[1]>=d[1]-0.5) or (v[1]>d[1]+0.5 and v[0]<=d[0]))]
    print(f"{w:18} n={n:4} djinn p99 {d[0]:9.0f} done {d[1]:7.0f} | oracle {o[0]:9.0f} | beats djinn: {worse}")
