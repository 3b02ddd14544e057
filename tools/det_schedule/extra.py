from model import *
# phase-switch bubble and per-CTA overhead, real sections, h = 0.75
REAL={'1k':(128,16,16,0),'4k':(32,64,4,2),'16k':(8,256,1,8)}
for sz,(P,M,S,d) in REAL.items():
    cur=current(P,M,S); cd=cross_delta(P,M,max(S,2),d)
    for o in [0,0.5,1]:
        a=simulate(cur,0.75,overhead=o)['makespan']
        row=[]
        for sw in [0,0.5,1]:
            b=simulate(cd,0.75,overhead=o,switch=sw)['makespan']
            row.append(round(b/a,3))
        print(sz,'overhead',o,'cross_delta/current makespan for switch 0,.5,1:',row,flush=True)
# other shapes: 2k (64 pairs, M 32, S 8), 8k (16 pairs, M 128, S 2)
for name,(P,M,S) in {'2k':(64,32,8),'8k':(16,128,2)}.items():
    d=pick_delta(P,M)
    print(name,'delta',d,flush=True)
    for sch,c in [('current',current(P,M,S)),('cross',cross_delta(P,M,max(S,2),0)),('cross_delta',cross_delta(P,M,max(S,2),d)),('split',split(P,M,S))]:
        print(name,sch,[round(simulate(c,h)['busy'],3) for h in [0,0.5,0.75,1,1.25]],
              'jit.1 h.75',round(sum(simulate(c,0.75,jitter=0.1,seed=s)['busy'] for s in (1,2,3))/3,3),flush=True)
