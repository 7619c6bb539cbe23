# Summary of a v7p layer-0 trace (DJINN_CUDA_ATTN_TRACE=1 bench output, gzipped): python3 a8_trace_summary.py TRACE.gz 264
# (264 = lines per dump: 2 consumer warpgroups x 132 CTAs); prints the first and the last dump.
import gzip,sys,statistics as st
lines=[l.split() for l in gzip.open(sys.argv[1],'rt') if l.startswith('v7trace')]
n=int(sys.argv[2])
print("dumps", len(lines)/n)
for d in (0, len(lines)//n - 1):
    L=lines[d*n:(d+1)*n]
    f=lambda k: [int(x[x.index(k)+1]) for x in L]
    start=f('start_ns'); dur=f('dur_ns'); cyc=f('cycles'); setup=f('setup'); wk0=f('wait_k0'); loop=f('loop'); tail=f('tail'); ch=f('chunks'); it=f('items')
    t0=min(start); end=[s+d_ for s,d_ in zip(start,dur)]
    print("dump",d,"kernel span us %.1f"%((max(end)-t0)/1e3), "start spread us %.1f"%((max(start)-t0)/1e3), "end min/med/max us %.1f %.1f %.1f"%((min(end)-t0)/1e3, st.median(end)/1e3-t0/1e3,(max(end)-t0)/1e3))
    ghz=[c/d_ for c,d_ in zip(cyc,dur)]
    print(" clock GHz med %.3f"%st.median(ghz))
    tot=sum(cyc)
    for name,v in (('setup',setup),('wait_k0',wk0),('loop',loop),('tail',tail)):
        print(" %-8s %5.1f%% of cycles  (mean per WG %.0f)"%(name,100*sum(v)/tot, sum(v)/len(v)))
    other=[c-a-b-l-t for c,a,b,l,t in zip(cyc,setup,wk0,loop,tail)]
    print(" other(Q0 load, softmax0 etc not in loop?) %.1f%%"%(100*sum(other)/tot))
    print(" loop cycles per chunk per WG: %.0f (mean); items/WG %.2f chunks/WG %.2f"%(sum(loop)/sum(ch), st.mean(it), st.mean(ch)))
    wg0=[x for x in L if x[4]=='0']; wg1=[x for x in L if x[4]=='1']
    print(" chunks wg0 %d wg1 %d"%(sum(int(x[x.index('chunks')+1]) for x in wg0), sum(int(x[x.index('chunks')+1]) for x in wg1)))
    # per-CTA work balance
    ctas={}
    for x in L:
        ctas.setdefault(int(x[2]),[]).append(x)
    cc=[int(v[1][v[1].index('chunks')+1]) for k,v in sorted(ctas.items())]
    print(" wg1 chunks per CTA min/max", min(cc), max(cc), "end spread (max-min) us %.1f"%((max(end)-min(end))/1e3))
