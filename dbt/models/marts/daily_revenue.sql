with purchases as (
    select * from {{ ref('stg_faker__purchases') }}
),

products as (
    select * from {{ ref('stg_faker__products') }}
),

bought as (
    select
        cast({{ dbt.date_trunc('day', 'purchases.purchased_at') }} as date) as revenue_date,
        purchases.is_returned,
        products.price
    from purchases
    inner join products on purchases.product_id = products.product_id
    where purchases.is_purchased
),

final as (
    select
        revenue_date,
        count(*) as purchase_count,
        sum(case when is_returned then 1 else 0 end) as return_count,
        sum(case when is_returned then 0 else price end) as net_revenue
    from bought
    group by revenue_date
)

select * from final
